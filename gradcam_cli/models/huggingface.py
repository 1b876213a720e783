"""Hugging Face image classifiers: a save_pretrained folder, or hf:ORG/NAME in the local
cache, loaded offline with the preprocessing and labels the folder describes."""

from __future__ import annotations

from pathlib import Path

from .base import LoadedModel, ModelError


def load_folder(path: Path, trust_model: bool) -> LoadedModel:
    """A folder written by ``save_pretrained`` (config.json, the weights, the image
    processor's preprocessor_config.json)."""
    raise ModelError(f"--model_path {path} is a folder; give the model file inside it")


def load_from_cache(repo_id: str, trust_model: bool) -> LoadedModel:
    """``hf:ORG/NAME``: the model of that hub id, from the local Hugging Face cache."""
    raise ModelError(f"--model_path hf:{repo_id}: Hugging Face models are not supported yet")
