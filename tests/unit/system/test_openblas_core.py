"""finetune.system.openblas_core: the kernel OpenBLAS should run here, replacing only a generic fallback."""

import pytest

from finetune.system import openblas_core

AVX512_BF16 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}


@pytest.mark.parametrize(
    ("detected", "flags", "expected"),
    [
        ("Prescott", AVX512_BF16, "Cooperlake"),  # Debian's 0.3.21 on Sapphire Rapids (measured here)
        ("Prescott", AVX512_BF16 - {"avx512_bf16"}, "SkylakeX"),
        ("Nehalem", {"avx2", "fma"}, "Haswell"),
        ("Zen", AVX512_BF16, None),  # a CPU OpenBLAS knows keeps its own pick
        ("SkylakeX", AVX512_BF16, None),
        ("Prescott", {"sse4_2"}, None),  # nothing better to run
        (None, AVX512_BF16, None),  # could not ask: leave it alone
    ],
)
def test_core_override_only_replaces_a_generic_fallback(detected, flags, expected):
    assert openblas_core.core_override(detected, flags) == expected


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 fma avx512f\n\nflags\t\t: other\n")
    assert openblas_core.cpu_flags(str(info)) == {"fpu", "avx2", "fma", "avx512f"}
    assert openblas_core.cpu_flags(str(tmp_path / "missing")) == set()


def test_wanted_core_is_the_widest_kernel_the_flags_allow():
    assert openblas_core.wanted_core(AVX512_BF16) == "Cooperlake"
    assert openblas_core.wanted_core({"avx2", "fma", "avx512f"}) == "Haswell"  # AVX-512 needs all four parts
    assert openblas_core.wanted_core({"avx2"}) is None  # AVX2 without FMA: OpenBLAS's pick stands


def test_detected_core_of_a_missing_library_is_none(tmp_path):
    assert openblas_core.detected_core(str(tmp_path / "libopenblas.so.0"), timeout=60) is None
