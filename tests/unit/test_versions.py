"""Version floors are what the code calls: pyproject's torch floor and the Dockerfile's torch are at least the newest
torch API the code uses, and the pins leave torch free so a CUDA build installs beside them."""
import re
import subprocess
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# torch APIs the code may call, with the release that added them. Add a row when code starts calling a newer one.
TORCH_APIS = {
    "torch.optim.Muon": "2.9",
    "get_unsafe_globals_in_checkpoint": "2.6",
    "torch.serialization.safe_globals": "2.5",
    "torch.utils.flop_counter": "2.1",
    "register_step_pre_hook": "2.0",
}


def source_text() -> str:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return "\n".join((ROOT / f).read_text() for f in files if not f.startswith("tests/") and (ROOT / f).is_file())


def required_torch() -> tuple[Version, list[str]]:
    text = source_text()
    used = [api for api in TORCH_APIS if api in text]
    return max(Version(TORCH_APIS[api]) for api in used), used


def test_the_scan_sees_what_the_code_calls():
    need, used = required_torch()
    assert "torch.optim.Muon" in used and need >= Version("2.9"), used


def test_pyproject_torch_floor_covers_the_code():
    need, used = required_torch()
    spec = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert spec, "pyproject.toml: torch needs a '>=' floor"
    assert Version(spec.group(1)) >= need, f"pyproject torch>={spec.group(1)} but the code calls {used} (>= {need})"


def test_dockerfile_torch_covers_the_code():
    need, used = required_torch()
    tag = re.search(r"^FROM pytorch/pytorch:([\d.]+)-", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert tag, "docker/Dockerfile: expected a pytorch/pytorch:<version>-... base image"
    assert Version(tag.group(1)) >= need, f"Dockerfile torch {tag.group(1)} but the code calls {used} (>= {need})"


def test_pins_leave_torch_free_and_the_installed_torch_is_new_enough():
    """A CUDA torch (2.x+cu128) must install beside the pins: no torch, triton or nvidia-* line may pin it away."""
    import torch

    pins = [ln.split("==")[0].lower() for ln in (ROOT / "constraints" / "pins.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert not [p for p in pins if p in ("torch", "triton") or p.startswith("nvidia-")], pins
    assert "constraints/pins.txt" in (ROOT / "Makefile").read_text()
    assert Version(torch.__version__.split("+")[0]) >= required_torch()[0]
