"""Model cards (issue 39 item 4): the hub's format (YAML front matter with library_name, base_model, tags,
license where known, pipeline_tag), how the run trained, only the metrics it measured, and a usage snippet."""

import json

import yaml

from davae_cli.cards import model_card, run_summary, write_model_card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def fake_run(tmp_path, evals=True):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "tiny", "vae": {"base_vae": "madebyollin/taesd3"}}))
    (run / "run.json").write_text(json.dumps({"data": ["/data/photos"]}))
    events = [{"step": 0, "event": "start", "device": "cpu", "world_size": 1},
              {"step": 10, "event": "train", "elapsed_s": 7200.0, "l1": 0.1}]
    if evals:
        events += [{"step": 10, "event": "eval", "davae.psnr": 21.5, "base_half_bicubic.psnr": 20.25},
                   {"step": 20, "event": "eval", "davae.psnr": 23.125, "base_half_bicubic.psnr": 20.25}]
    events += [{"step": 20, "event": "train", "elapsed_s": 14400.0, "l1": 0.05}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n{torn")
    return run


def test_card_front_matter_training_and_last_eval(tmp_path):
    run = fake_run(tmp_path)
    text = model_card(tmp_path / "run" / "final", kind="davae", run_dir=run, base_model="madebyollin/taesd3")
    fm = front_matter(text)
    assert fm["library_name"] == "davae"
    assert fm["base_model"] == "madebyollin/taesd3"
    assert fm["license"] == "mit"  # TAESD3's
    assert "davae" in fm["tags"] and "da-vae" in fm["tags"]
    assert "pipeline_tag" not in fm  # a tokenizer has no hub pipeline
    body = text.split("\n---\n", 1)[1]
    assert "- preset: `tiny`" in body and "`/data/photos`" in body and "- steps: 20" in body
    assert "training time: 4.00 h on 1 x cpu" in body  # 14400 s: the last train event's clock
    # the last evaluation, not the first; every metric with its value
    assert "at step 20" in body and "| `davae.psnr` | 23.12 |" in body and "21.5" not in body
    assert "DetailAlignedVAE.from_pretrained" in body and "davae encode" in body


def test_card_without_evaluation_invents_nothing(tmp_path):
    run = fake_run(tmp_path, evals=False)
    text = model_card(tmp_path / "dit", kind="adapted-dit", run_dir=run, base_model="/local/folder",
                      conditioning="class")
    fm = front_matter(text)
    assert "license" not in fm and "base_model" not in fm  # a local folder: nothing known, nothing guessed
    assert "no held-out evaluation" in text and "| metric |" not in text
    assert "DAVAEPipeline.from_pretrained" in text and "class_labels=[1]" in text and "--class-id 1" in text


def test_card_of_a_converted_checkpoint_and_licences(tmp_path):
    text = model_card(tmp_path / "x", kind="adapted-dit", base_model="stabilityai/stable-diffusion-3.5-medium")
    fm = front_matter(text)
    assert fm["license"] == "other" and fm["license_name"] == "stabilityai-ai-community"
    assert "converted from a checkpoint, not trained here" in text
    assert 'prompt="a lighthouse at dusk"' in text
    assert front_matter(model_card(tmp_path / "n", kind="native-dit", conditioning="class"))["pipeline_tag"] == \
        "unconditional-image-generation"


def test_write_model_card_names_the_final_folder(tmp_path):
    tmp = tmp_path / "final.tmp"
    tmp.mkdir()
    path = write_model_card(tmp, folder=tmp_path / "final", kind="davae")
    assert path == tmp / "README.md"
    text = path.read_text()
    assert str(tmp_path / "final") in text and "final.tmp" not in text


def test_run_summary_of_a_missing_run_is_empty(tmp_path):
    s = run_summary(tmp_path / "nothing")
    assert s["steps"] is None and s["eval"] is None and s["config"] == {}


def test_every_export_carries_its_card(tmp_path, davae_dir):
    """train-vae's and adapt-dit's exports (here the --steps 0 ones) hold a README.md in the hub's format that
    names the folder as it is after the swap, and an export trained by nothing claims no metric."""
    from conftest import run_cli

    card = (davae_dir / "README.md").read_text()
    fm = front_matter(card)
    assert fm["library_name"] == "davae" and "da-vae" in fm["tags"]
    assert str(davae_dir) in card and ".tmp" not in card and "no held-out evaluation" in card
    from davae_cli.config import load_preset
    from davae_cli.train.dit import adapt_dit
    from davae_cli.train.vae import train_vae

    tiny = ["vae.base_vae=random", "vae.base_vae_subfolder=null", "adapt_dit.resolution=64",
            "dit.max_sequence_length=8", "train_vae.steps=0", "adapt_dit.steps=0"]
    train_vae(load_preset("tiny", tiny), [], tmp_path / "v")
    adapt_dit(load_preset("tiny", tiny), tmp_path / "v" / "final", tmp_path / "a")
    text = (tmp_path / "a" / "final" / "README.md").read_text()
    assert front_matter(text)["library_name"] == "davae"
    assert "DAVAEPipeline.from_pretrained" in text and 'prompt="a lighthouse at dusk"' in text
    assert str(tmp_path / "a" / "final") in text
