"""Helpers the benchmark scripts share (import as ``benchutil`` from a script in this folder)."""
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def l3_bytes() -> int:
    """The largest CPU cache's size from sysfs (Linux), else 32 MiB."""
    best = 0
    for i in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size") as f:
                v = f.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(v[-1:], 1)
        best = max(best, int(v.rstrip("KMG")) * mult)
    return best or 32 << 20


def rotating(objs):
    """A function returning objs[0], objs[1], ... in turn, round and round: one copy of an
    operand per call, so that with enough copies each call reads its operand from DRAM."""
    state = {"i": 0}

    def next_obj():
        o = objs[state["i"] % len(objs)]
        state["i"] += 1
        return o

    return next_obj
