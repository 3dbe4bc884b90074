"""L1's QEMU monitor: HMP over a unix socket, and where each CPU is in ``info registers -a``."""

import socket
import threading
from pathlib import Path

from hvlab.nested.monitor import cpu_report, hmp, parse_registers
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
MAP = "ffffffff81001000 t native_safe_halt\nffffffff81002000 T next_fn\n"


def test_parse_registers_finds_each_cpu_rip_privilege_and_halt():
    cpus = parse_registers(REGISTERS)
    assert [(c.index, c.rip, c.cpl, c.halted) for c in cpus] == [
        (0, 0xFFFFFFFF81001024, 0, True), (1, 0x7F4C2A1B9010, 3, False)]
    smap = SystemMap.parse(MAP)
    assert cpus[0].describe(smap) == "CPU 0: RIP 0xffffffff81001024 native_safe_halt+0x24 CPL0 halted"
    assert "user space" in cpus[1].describe(smap)


def _fake_qemu(path: Path, answers: dict[str, str], served: list[str]) -> threading.Thread:
    """A monitor like QEMU's: a banner and prompt, then per command its echo (with the line editor's
    escape sequences) and output, then the prompt again."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def serve():
        with server:
            for _ in range(len(answers) * 2):
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"QEMU 11.1.3 monitor - type 'help' for more information\r\n(qemu) ")
                    command = conn.recv(4096).decode().strip()
                    served.append(command)
                    body = answers[command].replace("\n", "\r\n").encode()
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


def test_cpu_report_samples_twice_and_keeps_the_raw_registers(tmp_path):
    sock = tmp_path / "monitor.sock"
    served: list[str] = []
    _fake_qemu(sock, {"info registers -a": REGISTERS}, served)
    lines = cpu_report(sock, SystemMap.parse(MAP), tmp_path / "l1-cpus.txt")
    assert served == ["info registers -a"] * 2
    assert [line.split(":")[0] for line in lines] == ["sample 1"] * 2 + ["sample 2"] * 2
    assert "native_safe_halt+0x24" in lines[0]
    assert (tmp_path / "l1-cpus.txt").read_text().count("CPU#0") == 2


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
