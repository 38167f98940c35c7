"""What the CPU can do, read from /proc/cpuinfo: the one place the runtime (`auto`, the bf16 backends)
and the benchmark report learn the CPU's vendor, model and instruction-set flags.

    cpu = cpu_info()                 # CpuInfo(vendor="GenuineIntel", model="Intel(R) Xeon(R) ...", flags=...)
    cpu.native_bf16, cpu.amx, cpu.int8_dot, cpu.avx2, cpu.kind

Flags, not model names, decide: `native_bf16` means the CPU computes bf16 dot products in hardware
(x86 `avx512_bf16` or `amx_bf16`, ARM `bf16`); without it bf16 is emulated through fp32 and is slower
than fp32, so no bf16 backend is chosen there (and asking for one is refused). `int8_dot` means int8
dot-product instructions (VNNI on x86: `avx512_vnni`, `avx_vnni`, or `amx_int8`; ARM `asimddp`/`i8mm`).
"""
from __future__ import annotations

import contextlib
import functools
import platform
import re
from dataclasses import dataclass

CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX-512 BF16, ARM BF16
AMX_FLAGS = ("amx_bf16", "amx_int8", "amx_tile")
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp", "i8mm")
# /proc/cpuinfo flags that name vector instructions (x86 "flags", ARM "Features"): what reports record
SIMD_FLAG = re.compile(r"^(sse\d.*|ssse3|avx.*|fma.*|f16c|amx.*|.*vnni.*|.*bf16.*|asimd.*|sve.*|neon|i8mm)$")


@dataclass(frozen=True)
class CpuInfo:
    vendor: str | None  # "GenuineIntel", "AuthenticAMD", an ARM implementer id, or None
    model: str | None  # "Intel(R) Xeon(R) Processor", "AMD EPYC 7B13", ...
    flags: frozenset  # every flag of the first processor

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def amx(self) -> bool:
        return any(f in self.flags for f in AMX_FLAGS)

    @property
    def int8_dot(self) -> bool:
        return any(f in self.flags for f in INT8_DOT_FLAGS)

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def simd_flags(self) -> list[str]:
        return sorted(f for f in self.flags if SIMD_FLAG.match(f))

    @property
    def kind(self) -> str:
        """A short name of the CPU's class for result tables: "AMX + bf16", "AVX-512 bf16", "AVX-512 VNNI",
        "AVX-512", "AVX2", or "other"."""
        if self.amx and self.native_bf16:
            return "AMX + bf16"
        if self.native_bf16:
            return "AVX-512 bf16" if self.avx512 else "bf16"
        if self.avx512:
            return "AVX-512 VNNI" if self.int8_dot else "AVX-512"
        if self.avx2:
            return "AVX2 + VNNI" if self.int8_dot else "AVX2"
        return "other"

    def describe(self) -> str:
        """"Intel(R) Xeon(R) Processor (AMX + bf16: amx_bf16, avx512_bf16, ...)" for log lines and errors."""
        named = [f for f in (*BF16_FLAGS, *AMX_FLAGS, *INT8_DOT_FLAGS, "avx512f", "avx2") if f in self.flags]
        return f"{self.model or 'unknown CPU'} ({self.kind}: {', '.join(dict.fromkeys(named)) or 'no listed flags'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """CpuInfo of the first processor in the text of a /proc/cpuinfo."""
    vendor = model = None
    flags: frozenset = frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "CPU implementer") and vendor is None:
            vendor = value.strip()
        elif key in ("model name", "Model") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(vendor, model, flags)


@functools.lru_cache(maxsize=None)
def cpu_info(path: str = CPUINFO) -> CpuInfo:
    """The CPU of this machine (cached); model from platform.processor() and no flags where `path` is missing."""
    text = ""
    with contextlib.suppress(OSError):
        with open(path) as fh:
            text = fh.read()
    info = parse_cpuinfo(text)
    if info.model is None:
        info = CpuInfo(info.vendor, platform.processor() or None, info.flags)
    return info


def require_native_bf16(backend: str) -> None:
    """Refuse the bf16 backend `backend` on a CPU without native bf16 (emulated bf16 is slower than fp32)."""
    from ..errors import ConfigError

    cpu = cpu_info()
    if not cpu.native_bf16:
        raise ConfigError(f"backend {backend!r} needs a CPU with native bf16 (flags amx_bf16 or avx512_bf16; ARM "
                          f"bf16), but this CPU is {cpu.describe()}: bf16 would be emulated and slower than fp32. "
                          "Use an fp32 or int8 backend instead ('torch', 'onnx', 'onnx-int8', 'openvino', "
                          "'openvino-int8')")
