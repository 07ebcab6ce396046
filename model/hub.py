# TEMPORARY (uncommitted) until the gguf branch lands
from pathlib import Path
def resolve_model(p):
    p = Path(p)
    if not (p / "config.json").exists():
        raise FileNotFoundError(p)
    return p
