"""The trainers (train-vae, adapt-dit) and the run-folder machinery they share."""
