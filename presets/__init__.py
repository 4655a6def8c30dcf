"""The bundled presets (YAML files beside this file), installed as the data package davae_cli.presets."""
