"""Peak-memory measurement of a load, in a child process (shared by benchmarks/scale.py and the tests).

`PEAK_RSS_PRELUDE` is Python source to paste into a child script just before the load it measures:
it defines `rss()` and `peak_rss()` (bytes) and records `before = rss()`. The kernel's peak counter
(VmHWM) is reset right there, so the imports' and warm-up's transient peaks do not count; where it
cannot be reset, the lifetime peak (ru_maxrss) is used. The peak of the load is `peak_rss() - before`.
"""

PEAK_RSS_PRELUDE = r"""
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def peak_rss():
    # VmHWM, reset to the current RSS just before the load (clear_refs 5), so that transient peaks
    # of imports and warm-up do not count; ru_maxrss (the lifetime peak) where it cannot be reset.
    if RESET:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    RESET = True
except OSError:
    RESET = False
before = rss()
"""
