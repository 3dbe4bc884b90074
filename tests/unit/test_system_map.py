"""System.map lookups name the function a kernel address is in, and only code symbols count."""

from hvlab.system_map import SystemMap

MAP = """\
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81001000 t native_safe_halt
ffffffff81001020 D some_data
ffffffff81001040 W weak_fn
not a line
0000000000000000 A fixed_percpu_data
"""


def test_lookup_names_the_code_symbol_at_or_below_an_address():
    m = SystemMap.parse(MAP)
    assert m.lookup(0xFFFFFFFF81001000) == "native_safe_halt+0x0"
    assert m.lookup(0xFFFFFFFF8100102E) == "native_safe_halt+0x2e"  # the data symbol between is skipped
    assert m.lookup(0xFFFFFFFF81001044) == "weak_fn+0x4"


def test_lookup_refuses_addresses_outside_the_map():
    m = SystemMap.parse(MAP)
    assert m.lookup(0x7F0000001000) is None  # user space: below every kernel symbol
    assert m.lookup(0xFFFFFFFFC0000000) is None  # a module: far beyond the last symbol



def test_kallsyms_lines_with_modules_parse_and_padding_is_not_a_function():
    m = SystemMap.parse("ffffffff81d12a20 t __pfx_pv_native_safe_halt\n"
                        "ffffffff81d12a30 t pv_native_safe_halt\n"
                        "ffffffffc0a01000 t svm_vcpu_run\t[kvm_amd]\n")
    assert m.lookup(0xFFFFFFFF81D12A28) is None or "__pfx_" not in m.lookup(0xFFFFFFFF81D12A28)
    assert m.lookup(0xFFFFFFFF81D12A3F) == "pv_native_safe_halt+0xf"
    assert m.lookup(0xFFFFFFFFC0A01010) == "svm_vcpu_run+0x10"
