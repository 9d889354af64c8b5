"""Shrink the bitsandbytes wheel in .whl/ to the CUDA 13 libraries the GPU machines use.

The device tool sends at most 64 MiB (tree + carried .whl/). bitsandbytes' wheel alone is 43 MB, most of it
libraries for CUDA 11.8-12.8 and ROCm that the GPU machines (torch cu130) never load. This rewrites the wheel
without them (RECORD updated to match) and keeps the original in .whl-full/ (git-ignored, not carried).

    python benchmarks/slim_bitsandbytes_wheel.py [.whl]
"""
import sys
import zipfile
from pathlib import Path

KEEP_LIBRARY = ("libbitsandbytes_cpu", "libbitsandbytes_cuda13")


def unneeded(name: str) -> bool:
    """A native library for a platform other than CPU or CUDA 13."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith("libbitsandbytes_") and not base.startswith(KEEP_LIBRARY)


def slim(wheel: Path) -> None:
    original = wheel.parent.parent / ".whl-full" / wheel.name
    if not original.exists():
        original.parent.mkdir(exist_ok=True)
        wheel.rename(original)
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if unneeded(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not unneeded(line.split(",", 1)[0])).encode()
            dst.writestr(item, data)
    print(f"{wheel.name}: {original.stat().st_size / 2**20:.1f} MiB -> {wheel.stat().st_size / 2**20:.1f} MiB")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl")
    wheels = sorted(folder.glob("bitsandbytes-*.whl"))
    if not wheels:
        sys.exit(f"no bitsandbytes wheel in {folder}: run ../shared/gpu/fetch-wheels first")
    for wheel in wheels:
        slim(wheel)


if __name__ == "__main__":
    main()
