"""Tiny real models and datasets for pipeline tests (fast on a CPU)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"

# a minimal chat template, so the 260K TinyStories model can stand in for an instruct model
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>\n{% endif %}")


def script_function(script: str, name: str):
    """A function of an entry point in scripts/ (they are files, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{script}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def tiny_chat_model(dest: Path) -> Path:
    dest = Path(dest)
    if not (dest / "config.json").exists():
        shutil.copytree(STORIES, dest, dirs_exist_ok=True)
        cfg = json.loads((dest / "tokenizer_config.json").read_text())
        cfg["chat_template"] = CHAT_TEMPLATE
        (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def tiny_dataset(dest: Path, users: int = 30, items: int = 50, seed: int = 0) -> Path:
    from data.process import prepare
    from data.synthetic import generate

    dest = Path(dest)
    if not (dest / "manifest.json").exists():
        files = generate(dest.parent / f"{dest.name}_raw", seed=seed, n_users=users, n_items=items,
                         min_per_user=20, max_per_user=30)
        prepare("synthetic", files["reviews"], dest, meta=files["meta"], oracle=files["oracle"], overwrite=True)
    return dest


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are overhead-bound: one thread is faster, and steadier on a shared 2-core machine.
    Autouse in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
