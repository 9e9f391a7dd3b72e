"""Statistics shared by the benchmark scripts' analyses (bench-pv.sh, scoreboard.sh).

Each script writes its analysis next to a copy of this module and runs it with python3, which
puts the analysis's own directory on sys.path.
"""
import math

# Two-sided 95% quantiles of Student's t for 0..30 degrees of freedom (index = df); the
# normal 1.96 beyond.
T95 = [0, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060,
       2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df):
    return T95[df] if df < len(T95) else 1.96


def stats(v):
    """(mean, half-width of the 95% CI or None, n) of the values in v that are not None."""
    v = [x for x in v if x is not None]
    n = len(v)
    if n == 0:
        return None, None, 0
    m = sum(v) / n
    if n < 2:
        return m, None, n
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    return m, t95(n - 1) * sd / math.sqrt(n), n


def ratio_ci(a, b):
    """(mean(a)/mean(b), half-width of an approximate 95% CI by the delta method, or None);
    (None, None) if either mean is missing or zero."""
    ma, ha, na = stats(a)
    mb, hb, nb = stats(b)
    if not ma or not mb:
        return None, None
    r = ma / mb
    if ha is None or hb is None:
        return r, None
    sa = ha / t95(na - 1)
    sb = hb / t95(nb - 1)
    rel = math.sqrt((sa / ma) ** 2 + (sb / mb) ** 2)
    return r, r * rel * t95(min(na, nb) - 1)
