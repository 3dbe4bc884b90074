"""L1's QEMU monitor: HMP over a unix socket, and where each CPU is in ``info registers -a``."""

import socket
import threading
from pathlib import Path

from hvlab.nested.monitor import cpu_report, hmp, lapic_summary, parse_registers
from hvlab.system_map import SystemMap

REGISTERS = """\
CPU#0
RAX=0000000000000000 RBX=ffffffff82a0c940 RCX=0000000000000001 RDX=0000000000000000
RIP=ffffffff81001024 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CR0=80050033 CR2=00007f4c2a1b9000 CR3=000000010a2c6000 CR4=00350ef0

CPU#1
RAX=0000000000000000 RBX=0000000000000000
RIP=00007f4c2a1b9010 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
"""
LAPIC = """\
dumping local APIC state for CPU 0

LVT0\t 0x00010700 active-hi edge  masked                      ExtINT (vec 0)
LVTT\t 0x000000ec active-hi edge                 one-shot     Fixed  (vec 236)
Timer\t DCR=0x3 (divide by 16) initial_count = 229316 current_count = 141455
SPIV\t 0x000001ff APIC enabled, focus=off, spurious vec 255
ISR\t (none)
IRR\t 236

APR 0x00 TPR 0x10 DFR 0x0f LDR 0x00 PPR 0x10
"""
MAP = "ffffffff81001000 t native_safe_halt\nffffffff81002000 T next_fn\n"


def test_parse_registers_finds_each_cpu_rip_privilege_and_halt():
    cpus = parse_registers(REGISTERS)
    assert [(c.index, c.rip, c.cpl, c.halted, c.interrupts) for c in cpus] == [
        (0, 0xFFFFFFFF81001024, 0, True, True), (1, 0x7F4C2A1B9010, 3, False, True)]
    smap = SystemMap.parse(MAP)
    assert cpus[0].describe(smap) == "CPU 0: RIP 0xffffffff81001024 native_safe_halt+0x24 CPL0 IF=1 halted"
    assert "user space" in cpus[1].describe(smap)


def _fake_qemu(path: Path, answers: dict[str, str], served: list[str]) -> threading.Thread:
    """A monitor like QEMU's: a banner and prompt, then per command its echo (with the line editor's
    escape sequences) and output, then the prompt again."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def serve():
        with server:
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"QEMU 11.1.3 monitor - type 'help' for more information\r\n(qemu) ")
                    command = conn.recv(4096).decode().strip()
                    served.append(command)
                    body = answers.get(command, "unknown command\n").replace("\n", "\r\n").encode()
                    conn.sendall(b"\x1b[K" + command.encode() + b"\r\n" + body + b"(qemu) ")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_hmp_returns_the_output_without_echo_or_prompt(tmp_path):
    sock = tmp_path / "monitor.sock"
    served: list[str] = []
    _fake_qemu(sock, {"info registers -a": REGISTERS}, served)
    assert hmp(sock, "info registers -a") == REGISTERS.strip()
    assert served == ["info registers -a"]


def test_lapic_summary_keeps_the_timer_and_pending_interrupts():
    assert lapic_summary(LAPIC) == (
        "LVTT active-hi edge one-shot Fixed (vec 236); timer DCR=0x3 (divide by 16) initial_count = 229316 "
        "current_count = 141455; IRR 236; ISR (none); APR 0x00 TPR 0x10 DFR 0x0f LDR 0x00 PPR 0x10")
    assert lapic_summary("unknown command") == "no LAPIC state"


def test_cpu_report_samples_twice_and_keeps_the_raw_output(tmp_path):
    sock = tmp_path / "monitor.sock"
    served: list[str] = []
    _fake_qemu(sock, {"info registers -a": REGISTERS, "info lapic 0": LAPIC, "info lapic 1": LAPIC}, served)
    lines = cpu_report(sock, SystemMap.parse(MAP), tmp_path / "l1-cpus.txt")
    assert served == ["info registers -a", "info lapic 0", "info lapic 1"] * 2
    assert [line.split(":")[0] for line in lines] == ["sample 1"] * 4 + ["sample 2"] * 4
    assert "native_safe_halt+0x24" in lines[0] and "CPU 0 LAPIC: LVTT" in lines[1] and "IRR 236" in lines[1]
    raw = (tmp_path / "l1-cpus.txt").read_text()
    assert raw.count("CPU#0") == 2 and raw.count("current_count = 141455") == 4


def test_cpu_report_says_when_qemu_does_not_answer(tmp_path):
    """A wedged QEMU (its monitor silent) is itself the finding."""
    sock = tmp_path / "monitor.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(1)  # accepts the connection, never sends the banner
    try:
        lines = cpu_report(sock, None, tmp_path / "l1-cpus.txt", timeout=0.5)
    finally:
        server.close()
    assert len(lines) == 1 and "did not answer" in lines[0] and "QEMU itself is stuck" in lines[0]
