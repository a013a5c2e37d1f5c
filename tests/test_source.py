"""Source specs and fetching: parsing, verification of sdists, and an intact cache on failure."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest

from velollm_patch import patches, proc, source
from velollm_patch.build import BuildOptions, plan_build
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import HardwareInfo
from velollm_patch.paths import Paths


@pytest.fixture
def tmp_paths(tmp_path: Path) -> Paths:
    return Paths(data=tmp_path / "data", cache=tmp_path / "cache")


def test_parse_specs() -> None:
    assert source.SourceSpec.parse("pypi:llama-cpp-python==0.3.36") == source.SourceSpec("pypi", "0.3.36")
    git = source.SourceSpec.parse("git:https://github.com/ggml-org/llama.cpp@b6000")
    assert (git.kind, git.location, git.ref) == ("git", "https://github.com/ggml-org/llama.cpp", "b6000")
    ssh = source.SourceSpec.parse("git:git@github.com:ggml-org/llama.cpp.git@master")
    assert (ssh.location, ssh.ref) == ("git@github.com:ggml-org/llama.cpp.git", "master")
    assert source.SourceSpec.parse("path:/opt/llama.cpp").location == "/opt/llama.cpp"
    assert str(source.SourceSpec.parse(source.DEFAULT_SOURCE)) == source.DEFAULT_SOURCE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("llama.cpp", "not understood"),
        ("pypi:torch==2.0", "only pypi:llama-cpp-python==VERSION"),
        ("git:https://example.invalid/llama.cpp", "give a ref"),
        ("svn:whatever", "source kind 'svn' is unknown"),
    ],
)
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(VelollmError, match=message):
        source.SourceSpec.parse(text)


def _fake_sdist(path: Path, payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("llama_cpp_python-0.3.36/README")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def test_wrong_hash_sdist_is_refused_and_cache_stays_empty(tmp_path: Path, tmp_paths: Paths) -> None:
    sdist = _fake_sdist(tmp_path / "llama_cpp_python-0.3.36.tar.gz")
    with pytest.raises(VelollmError, match="has sha256 .* expected 832db0699007f1be.*corrupt"):
        source.fetch(f"sdist:{sdist}", tmp_paths)
    assert source.list_sources(tmp_paths) == []
    assert not any(tmp_paths.sources.iterdir())  # no half-extracted temporary directory either


def test_unpinned_and_misnamed_sdists(tmp_path: Path, tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError, match="no pin for llama-cpp-python 0.0.1"):
        source.fetch(f"sdist:{_fake_sdist(tmp_path / 'llama_cpp_python-0.0.1.tar.gz')}", tmp_paths)
    with pytest.raises(VelollmError, match="is not a llama-cpp-python sdist"):
        source.fetch(f"sdist:{_fake_sdist(tmp_path / 'other-1.0.tar.gz')}", tmp_paths)
    with pytest.raises(VelollmError, match="does not exist"):
        source.fetch(f"sdist:{tmp_path / 'llama_cpp_python-0.3.36.tar.gz'}", tmp_paths)
    with pytest.raises(VelollmError, match=r"no pin for llama-cpp-python 9.9.9.*known: 0.3.35, 0.3.36\)"):
        source.fetch("pypi:llama-cpp-python==9.9.9", tmp_paths)


def test_path_source_must_be_a_llama_cpp_tree(tmp_path: Path, tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError, match="is not a llama.cpp source directory"):
        source.fetch(f"path:{tmp_path}", tmp_paths)
    (tmp_path / "ggml").mkdir()
    (tmp_path / "CMakeLists.txt").write_text('set(LLAMA_VERSION "1.2.3")\n')
    local = source.fetch(f"path:{tmp_path}", tmp_paths)
    assert (local.tree, local.commit, local.llama_version) == (tmp_path, None, "1.2.3")


def test_git_source_from_a_local_repository(tmp_path: Path, tmp_paths: Paths) -> None:
    import subprocess

    repo = tmp_path / "upstream"
    (repo / "ggml").mkdir(parents=True)
    (repo / "ggml" / "x.c").write_text("int x;\n")
    (repo / "CMakeLists.txt").write_text('set(LLAMA_VERSION "9.9.9")\n')
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v"],
                 ["tag", "b1"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    fetched = source.fetch(f"git:{repo}@b1", tmp_paths)
    assert fetched.commit is not None and len(fetched.commit) == 40
    assert (fetched.tree / "ggml" / "x.c").read_text() == "int x;\n"
    assert not (fetched.tree / ".git").exists()
    # cached read-only: files cannot be edited in place
    assert not (fetched.tree / "ggml" / "x.c").stat().st_mode & 0o200
    copy = source.fresh_copy(fetched, tmp_path / "copy")
    (copy / "ggml" / "x.c").write_text("patched\n")
    assert (fetched.tree / "ggml" / "x.c").read_text() == "int x;\n"
    assert source.fetch(f"git:{repo}@b1", tmp_paths) == fetched  # second fetch is the cache
    with pytest.raises(VelollmError, match="could not fetch nope"):
        source.fetch(f"git:{repo}@nope", tmp_paths)


def test_trimmed_export_keeps_its_commit_for_a_path_source(tmp_path: Path, tmp_paths: Paths) -> None:
    # A trimmed tree shipped to another machine has no .git: the export records the upstream commit, so a
    # path: source of the unpacked tree can still be matched to its patch series there.
    tree = tmp_path / "tree"
    (tree / "ggml").mkdir(parents=True)
    (tree / "src").mkdir()
    (tree / "src" / "llama.cpp").write_text("int main;\n")
    (tree / "CMakeLists.txt").write_text('set(LLAMA_VERSION "1.2.3")\n')
    commit = source.PINS[source.DEFAULT_PIN].commit
    shipped = source.Source(spec="pypi:llama-cpp-python==0.3.36", tree=tree, commit=commit, llama_version="1.2.3",
                            sdist_sha256=None, fetched_at="now")
    tarball = source.export_trimmed(shipped, tmp_path / "out" / "tree.tar.gz")
    time.sleep(1.1)  # a gzip header or a marker stamped with the time would differ now
    again = source.export_trimmed(shipped, tmp_path / "again" / "tree.tar.gz")
    assert tarball.read_bytes() == again.read_bytes()  # the same tree, the same bytes: builds from it are reused
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    unpacked = tmp_path / "unpacked" / f"llama.cpp-{commit[:7]}"
    assert (unpacked / "src" / "llama.cpp").read_text() == "int main;\n"
    assert source.fetch(f"path:{unpacked}", tmp_paths).commit == commit
    (unpacked / source.EXPORT_MARKER).write_text('{"commit": "not a commit"}')
    assert source.fetch(f"path:{unpacked}", tmp_paths).commit is None


@pytest.mark.slow
def test_the_trimmed_export_of_the_pin_is_patched_and_configured_from_a_path_source(
    paths: Paths, live_hardware: HardwareInfo, tmp_path: Path
) -> None:
    # What another machine gets: the tarball alone, unpacked, as a path: source. tools/CMakeLists.txt adds every
    # tool's directory, so a trimmed tree without one of them failed to configure, and one without
    # scripts/ui-assets.cmake failed to build llama-server.
    tarball = source.export_trimmed(source.fetch(source.DEFAULT_SOURCE, paths), tmp_path / "tree.tar.gz")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    plan = plan_build(BuildOptions(gpu="cpu", source=f"path:{unpacked}"), live_hardware, paths)
    assert plan.selected and plan.source.commit == source.PINS[source.DEFAULT_PIN].commit
    tree = source.fresh_copy(plan.source, tmp_path / "patched")
    assert plan.series is not None
    patches.apply(plan.series, plan.selected, tree)
    generator_free = [a for a in plan.cmake_args if not a.startswith("-G")]
    configured = proc.run(["cmake", "-S", tree, "-B", tmp_path / "build", *generator_free], check=False, timeout=600)
    assert configured.returncode == 0, configured.tail()
    # the one build step that reads a file outside the trimmed directories: embedding the web UI in the server
    ui = proc.run(["cmake", "--build", tmp_path / "build", "--target", "llama-ui-assets"], check=False, timeout=600)
    assert ui.returncode == 0, ui.tail()
