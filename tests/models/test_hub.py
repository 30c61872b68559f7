"""The Hugging Face Hub: loading pyvq models (and diffusers folders) by repository
id from a Hub cache built in ``tmp_path``, and ``push_to_hub`` /
``save_pretrained(push_to_hub=True)`` against a monkeypatched ``HfApi``.

No test touches the network: every socket connection and every ``HfApi``
call that would reach the Hub raises (``no_network``, autouse); the few
tests of the download path replace ``huggingface_hub.snapshot_download`` by
a fake that writes into the temporary cache.

The cache is laid out as huggingface_hub documents it
(``models--owner--name/{blobs,refs,snapshots}``, snapshot files are relative
symlinks to blobs, ``refs/<branch>`` holds the commit) and checked with
huggingface_hub's own ``scan_cache_dir`` and ``try_to_load_from_cache``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import socket
import tempfile

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from pyvq.convert import from_diffusers
from pyvq.models import VQGAN, AutoencoderKL, PretrainedModel, get_preset, load_pretrained, load_run
from tests.test_convert import KL_DIR_CONFIG, _kl_pyvq_source, _write_diffusers_dir

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = "someone/tiny-vqgan"
FILES = ["config.json", "model.safetensors"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that tries to reach the network; start from 'online' (no
    HF_HUB_OFFLINE), whatever the environment says."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to use the network: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("repo_info", "model_info", "list_repo_tree", "create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def tiny_model(seed: int) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(get_preset("vqgan_tiny")).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # 40 hex digits, like a git commit


def add_snapshot(cache, repo_id: str, folder, *, commit: str, refs=("main",), prefix: str = "") -> str:
    """Put the files of ``folder`` into the Hub cache ``cache`` as revision
    ``commit`` of ``repo_id`` (under ``prefix`` in the repository), with the
    branches/tags ``refs`` pointing at it. Returns the snapshot folder."""
    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo_dir / "snapshots" / commit
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / prefix / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return str(snapshot)


@pytest.fixture
def cached(tmp_path):
    """A cache holding REPO at two commits: main -> model A, tag v1 -> model B,
    and model A also in subfolder 'tokenizer' of another repository."""
    cache = tmp_path / "hub"
    models = {"A": tiny_model(1), "B": tiny_model(2)}
    commits = {"A": commit_of("a"), "B": commit_of("b")}
    for key, model in models.items():
        model.save_pretrained(tmp_path / key)
    add_snapshot(cache, REPO, tmp_path / "A", commit=commits["A"], refs=("main",))
    add_snapshot(cache, REPO, tmp_path / "B", commit=commits["B"], refs=("v1",))
    add_snapshot(cache, "someone/pipeline", tmp_path / "A", commit=commit_of("p"), prefix="tokenizer")
    return cache, models, commits


def test_cache_layout_is_huggingface_hubs(cached):
    cache, _, commits = cached
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {REPO, "someone/pipeline"}
    revisions = {rev.commit_hash: rev for rev in repos[REPO].revisions}
    assert set(revisions) == set(commits.values())
    assert revisions[commits["A"]].refs == {"main"} and revisions[commits["B"]].refs == {"v1"}
    assert sorted(f.file_name for f in revisions[commits["A"]].files) == FILES
    path = huggingface_hub.try_to_load_from_cache(REPO, "config.json", cache_dir=cache, revision="v1")
    assert isinstance(path, str) and path.endswith(os.path.join(commits["B"], "config.json"))


@pytest.mark.parametrize("how", ["env", "constant", "argument"])
def test_load_by_repo_id_offline(cached, monkeypatch, how):
    cache, models, _ = cached
    kwargs = {"cache_dir": cache}
    if how == "env":  # set after huggingface_hub was imported: pyvq reads it at call time
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif how == "constant":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        kwargs["local_files_only"] = True
    model = VQGAN.from_pretrained(REPO, **kwargs)
    assert type(model) is VQGAN and not model.training and same_weights(model, models["A"])
    assert model.config == models["A"].config
    assert same_weights(load_pretrained(REPO, **kwargs), models["A"])
    assert same_weights(PretrainedModel.from_pretrained(REPO, **kwargs), models["A"])


def test_load_by_revision_and_subfolder(cached, monkeypatch):
    cache, models, commits = cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_weights(VQGAN.from_pretrained(REPO, revision="v1", cache_dir=cache), models["B"])
    assert same_weights(VQGAN.from_pretrained(REPO, revision=commits["B"], cache_dir=cache), models["B"])
    assert same_weights(load_pretrained(REPO, revision=commits["A"], cache_dir=cache), models["A"])
    pipe = VQGAN.from_pretrained("someone/pipeline", subfolder="tokenizer", cache_dir=cache)
    assert same_weights(pipe, models["A"])
    with pytest.raises(FileNotFoundError, match="someone/pipeline"):
        VQGAN.from_pretrained("someone/pipeline", cache_dir=cache)  # the files are in tokenizer/ only


def test_cache_is_used_first_without_network(cached, monkeypatch):
    """Online (no offline flag), a cached repository loads with no Hub call
    (no_network would fail the test), also from the default cache location."""
    cache, models, _ = cached
    assert same_weights(VQGAN.from_pretrained(REPO, cache_dir=cache), models["A"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert same_weights(load_run(REPO), models["A"])
    assert same_weights(VQGAN.from_pretrained(REPO, revision="v1"), models["B"])


def test_local_directory_wins(cached, tmp_path, monkeypatch):
    cache, models, _ = cached
    owner = tmp_path / "cwd" / "someone"
    owner.mkdir(parents=True)
    models["B"].save_pretrained(owner / "tiny-vqgan")  # a local folder spelled like the repository
    monkeypatch.chdir(tmp_path / "cwd")
    assert same_weights(VQGAN.from_pretrained(REPO, cache_dir=None), models["B"])
    for load in (VQGAN.from_pretrained, PretrainedModel.from_pretrained):
        with pytest.warns(UserWarning, match="local directory.*revision") as record:
            load(REPO, revision="v1")
        assert record[0].filename == __file__  # the warning points at the caller
    models["A"].save_pretrained(owner / "tiny-vqgan" / "sub")
    assert same_weights(load_pretrained(REPO, subfolder="sub"), models["A"])


def test_not_cached_error_names_the_repository(cached, monkeypatch):
    cache, _, _ = cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        VQGAN.from_pretrained("someone/elsewhere", cache_dir=cache)
    text = str(info.value)
    for part in ("'someone/elsewhere'", "revision 'main'", "HF_HUB_OFFLINE", "hf download someone/elsewhere",
                 "cache_dir", str(cache)):
        assert part in text, (part, text)
    with pytest.raises(FileNotFoundError, match=r"(?s)'v2'.*local_files_only=True.*--revision v2"):
        load_pretrained(REPO, revision="v2", cache_dir=cache, local_files_only=True)
    # A snapshot that lacks a file counts as not cached.
    snapshot = cache / repo_folder_name(repo_id=REPO, repo_type="model") / "snapshots" / commit_of("a")
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks some of the files"):
        VQGAN.from_pretrained(REPO, cache_dir=cache)


def test_bad_names_are_not_sent_to_the_hub(tmp_path):
    for name in (tmp_path / "missing", "a/b/c", "../x"):
        with pytest.raises(FileNotFoundError, match="no such directory"):
            VQGAN.from_pretrained(name)
    with pytest.raises(TypeError, match="subfolder"):
        VQGAN.from_pretrained(REPO, subfolder=3)


class FakeDownload:
    """snapshot_download with the cache lookup real and the download faked:
    a download writes ``source`` into the cache, as a download would."""

    def __init__(self, cache, source, prefix=""):
        self.cache, self.source, self.prefix, self.calls = cache, source, prefix, []
        self.real = huggingface_hub.snapshot_download

    def __call__(self, repo_id, **kwargs):
        self.calls.append(dict(kwargs, repo_id=repo_id))
        if kwargs.get("local_files_only"):
            return self.real(repo_id, **kwargs)
        assert kwargs["library_name"] == "pyvq"
        wanted = [p[len(self.prefix):] for p in kwargs["allow_patterns"]]
        staged = self.cache.parent / f"staged{len(self.calls)}"
        staged.mkdir()
        for name in os.listdir(self.source):
            if any(fnmatch.fnmatch(name, p) for p in wanted):
                (staged / name).write_bytes((self.source / name).read_bytes())
        return add_snapshot(self.cache, repo_id, staged, commit=commit_of("new"), prefix=self.prefix.rstrip("/"),
                            refs=(kwargs["revision"] or "main",))


def test_download_only_when_not_cached_and_allowed(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    model = tiny_model(3)
    model.save_pretrained(tmp_path / "src")
    fake = FakeDownload(cache, tmp_path / "src")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        VQGAN.from_pretrained("someone/new", cache_dir=cache)
    assert [c["local_files_only"] for c in fake.calls] == [True]  # looked in the cache, never downloaded
    monkeypatch.delenv("HF_HUB_OFFLINE")

    loaded = VQGAN.from_pretrained("someone/new", cache_dir=cache, token="t0ken")
    assert same_weights(loaded, model)
    download = fake.calls[-1]
    assert not download.get("local_files_only") and download["token"] == "t0ken"
    assert sorted(download["allow_patterns"]) == FILES and download["cache_dir"] == cache
    n = len(fake.calls)
    assert same_weights(VQGAN.from_pretrained("someone/new", cache_dir=cache), model)  # now cached
    assert [c["local_files_only"] for c in fake.calls[n:]] == [True]


def test_from_diffusers_by_repo_id(tmp_path, monkeypatch):
    # A diffusers AutoencoderKL folder written without diffusers (importing it takes ~10 s).
    source = _kl_pyvq_source()
    _write_diffusers_dir(source, "AutoencoderKL", KL_DIR_CONFIG, tmp_path / "vae")
    expected = from_diffusers(tmp_path / "vae")
    assert same_weights(expected, source)
    cache = tmp_path / "hub"
    add_snapshot(cache, "someone/sd-like", tmp_path / "vae", commit=commit_of("sd"), prefix="vae")
    add_snapshot(cache, "someone/vae-only", tmp_path / "vae", commit=commit_of("vae"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = from_diffusers("someone/sd-like", subfolder="vae", cache_dir=cache)
    assert type(model) is AutoencoderKL and same_weights(model, expected)
    assert same_weights(from_diffusers("someone/vae-only", cache_dir=cache), expected)
    with pytest.raises(FileNotFoundError, match=r"someone/sd-like.*downloads are off"):
        from_diffusers("someone/sd-like", cache_dir=cache)  # a pipeline: the VAE is in vae/
    with pytest.raises(FileNotFoundError, match=r"'someone/missing'.*subfolder 'vae'"):
        from_diffusers("someone/missing", subfolder="vae", cache_dir=cache)
    with pytest.raises(ValueError, match="subfolder"):
        from_diffusers(torch.nn.Linear(1, 1), subfolder="vae")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    # Online and not cached: only the safetensors weights are fetched, not the .bin beside them.
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not needed")
    fake = FakeDownload(cache, tmp_path / "vae", prefix="vae/")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model = from_diffusers("someone/new-pipe", subfolder="vae", revision="fp32", cache_dir=cache)
    assert same_weights(model, expected)
    downloads = [c for c in fake.calls if not c.get("local_files_only")]
    assert len(downloads) == 1 and downloads[0]["revision"] == "fp32"
    assert downloads[0]["allow_patterns"] == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


# ----------------------------------------------------------------- push_to_hub
class FakeHub:
    """HfApi's create_repo / create_branch / upload_folder, recorded; an upload
    reads the folder at call time and 'publishes' the allowed files into a
    Hub cache, so they can be loaded back offline."""

    def __init__(self, cache, fail=False):
        self.cache, self.fail, self.calls, self.seen = cache, fail, [], {}

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

        def create_branch(api, repo_id, **kwargs):
            hub.calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(api, *, repo_id, folder_path, allow_patterns, **kwargs):
            hub.calls.append(("upload_folder", repo_id, dict(kwargs, allow_patterns=allow_patterns)))
            hub.seen = {name: os.path.isfile(os.path.join(folder_path, name)) for name in os.listdir(folder_path)}
            if hub.fail:
                raise OSError("503 Service Unavailable")
            staged = hub.cache.parent / "published"
            staged.mkdir(exist_ok=True)
            for name in allow_patterns:
                (staged / name).write_bytes(open(os.path.join(folder_path, name), "rb").read())
            add_snapshot(hub.cache, repo_id, staged, commit=commit_of(f"{repo_id}{len(hub.calls)}"), refs=(kwargs["revision"] or "main",))
            return "commit-info"

        for name, fn in (("create_repo", create_repo), ("create_branch", create_branch),
                         ("upload_folder", upload_folder)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
        return self


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """tempfile's folder (where push_to_hub saves before uploading), inside tmp_path."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_push_to_hub_uploads_the_saved_files(tmp_path, monkeypatch, temp_root):
    cache = tmp_path / "hub"
    hub = FakeHub(cache).install(monkeypatch)
    model = tiny_model(5)
    out = model.push_to_hub("me/pushed", private=True, token="tok", commit_message="first")
    assert out == "commit-info"
    (_, repo, create), (_, repo2, upload) = hub.calls
    assert repo == repo2 == "me/pushed" and create["private"] is True and create["exist_ok"] is True
    assert sorted(upload["allow_patterns"]) == FILES and upload["commit_message"] == "first"
    assert hub.seen == dict.fromkeys(FILES, True)
    assert os.listdir(temp_root) == []  # the temporary save is gone once uploaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_weights(VQGAN.from_pretrained("me/pushed", cache_dir=cache), model)

    hub.calls.clear()
    model.push_to_hub("me/pushed", revision="dev")
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[1][2]["branch"] == "dev" and hub.calls[2][2]["revision"] == "dev"
    assert same_weights(load_pretrained("me/pushed", revision="dev", cache_dir=cache), model)


def test_save_pretrained_push_to_hub_saves_locally_first(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    model = tiny_model(6)
    folder = tmp_path / "my-vqgan"
    folder.mkdir()
    (folder / "notes.txt").write_text("not pyvq's")
    assert model.save_pretrained(folder, push_to_hub=True, private=False) == "commit-info"
    assert hub.seen == {**dict.fromkeys(FILES, True), "notes.txt": True}  # saved before the upload
    (_, repo, create), (_, _, upload) = hub.calls
    assert repo == "my-vqgan" and create["private"] is False  # the folder's name, in the user's namespace
    assert sorted(upload["allow_patterns"]) == FILES  # only what pyvq saved
    assert same_weights(VQGAN.from_pretrained(folder), model)

    hub.calls.clear()
    model.save_pretrained(folder, push_to_hub=True, repo_id="me/other", commit_message=None)
    assert hub.calls[0][1] == "me/other" and hub.calls[1][2]["commit_message"] == "Upload VQGAN"


def test_failed_upload_keeps_the_files(tmp_path, monkeypatch, temp_root):
    FakeHub(tmp_path / "hub", fail=True).install(monkeypatch)
    model = tiny_model(7)
    with pytest.raises(OSError, match="503") as info:
        model.save_pretrained(tmp_path / "kept", push_to_hub=True, repo_id="me/x")
    assert same_weights(VQGAN.from_pretrained(tmp_path / "kept"), model)
    assert any(str(tmp_path / "kept") in note for note in info.value.__notes__)
    with pytest.raises(OSError, match="503") as info:
        model.push_to_hub("me/x")
    (note,) = info.value.__notes__
    kept = note.split("kept in ")[1].strip("'")
    assert os.path.dirname(kept) == str(temp_root)
    assert same_weights(VQGAN.from_pretrained(kept), model)


def test_push_arguments_are_checked(tmp_path, temp_root):
    model = tiny_model(8)
    with pytest.raises(TypeError, match=r"\['repo_id'\] apply only with push_to_hub=True"):
        model.save_pretrained(tmp_path / "m", repo_id="me/x")
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['privat'\]"):
        model.save_pretrained(tmp_path / "m", push_to_hub=True, privat=True)
    with pytest.raises(TypeError, match="'push_to_hub' must be a bool"):
        model.save_pretrained(tmp_path / "m", "me/x")
    with pytest.raises(ValueError, match="'repo_id' must be a Hub repository id"):
        model.push_to_hub("a/b/c")
    assert not (tmp_path / "m").exists() and os.listdir(temp_root) == []  # arguments checked before writing
