"""The registry of the course's shipped models: folders of checkpoint.save_model's layout with
their tokenizer, made by `make assets` (assets/make_assets.py, one entry a model) and shipped
as the package data `llama3_mini.assets`. Loading one is `llama3_mini.load(name)`."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "story-model"  # pretrained on the story corpus: what `load()` gives
CHAT_MODEL = "qa-full"  # fine-tuned to answer questions about a story: chat and serve's default


def _assets_folder() -> Path:
    """The pretrained models' folder: the checkout's top-level assets/ in an editable
    install, a folder inside the installed package from a wheel."""
    try:
        return Path(str(resources.files("llama3_mini.assets")))
    except ModuleNotFoundError:  # a checkout put on sys.path by hand, never installed
        return Path(__file__).resolve().parent.parent / "assets"


ASSETS = _assets_folder()


def pretrained_models() -> list[str]:
    """The shipped models' names: the asset folders that hold a model."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "model.safetensors").is_file())


def pretrained_folder(name: str) -> Path:
    """The folder of the shipped model `name`, or an error that lists the names there are."""
    available = pretrained_models()
    if name not in available:
        raise FileNotFoundError(
            f"no pretrained model {name!r} in {ASSETS}; the available models are: "
            f"{', '.join(available) or 'none'} (`make assets` makes them in a checkout)")
    return ASSETS / name
