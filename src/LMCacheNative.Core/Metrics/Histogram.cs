namespace LMCacheNative.Core.Metrics;

/// <summary>
/// A Prometheus histogram counted without a lock: one atomic increment of the value's bucket and
/// one compare-and-swap on the sum per observation, so request threads never wait for each other
/// or for a scrape. Buckets are stored non-cumulative; <see cref="Snapshot"/> accumulates them, and
/// the count is the sum of the buckets, so a scrape always sees <c>_count == _bucket{le="+Inf"}</c>
/// and non-decreasing buckets even while observations land (the sum may lag by one observation).
/// </summary>
public sealed class Histogram
{
    private readonly double[] _upperBounds;
    // [i] counts values in (bound[i-1], bound[i]]; the last slot counts values above every bound (+Inf).
    private readonly long[] _buckets;
    private long _sumBits; // the sum as the bits of a double (Interlocked has no double add)

    /// <param name="upperBounds">finite, strictly increasing upper bounds ("le"); +Inf is implicit</param>
    public Histogram(IReadOnlyList<double> upperBounds)
    {
        for (int i = 0; i < upperBounds.Count; i++)
        {
            if (!double.IsFinite(upperBounds[i])) throw new ArgumentException($"bucket bound {upperBounds[i]} is not finite");
            if (i > 0 && upperBounds[i] <= upperBounds[i - 1]) throw new ArgumentException("bucket bounds must increase strictly");
        }
        _upperBounds = upperBounds.ToArray();
        _buckets = new long[_upperBounds.Length + 1];
    }

    public IReadOnlyList<double> UpperBounds => _upperBounds;

    /// <summary>Counts one value (NaN is ignored: it belongs to no bucket and would poison the sum).</summary>
    public void Observe(double value)
    {
        if (double.IsNaN(value)) return;
        // Prometheus buckets are "less than or equal": the first bound >= value.
        int index = Array.BinarySearch(_upperBounds, value);
        if (index < 0) index = ~index;
        Interlocked.Increment(ref _buckets[index]);
        long seen = Volatile.Read(ref _sumBits);
        while (true)
        {
            long updated = BitConverter.DoubleToInt64Bits(BitConverter.Int64BitsToDouble(seen) + value);
            long previous = Interlocked.CompareExchange(ref _sumBits, updated, seen);
            if (previous == seen) return;
            seen = previous;
        }
    }

    public HistogramSnapshot Snapshot()
    {
        var cumulative = new long[_buckets.Length];
        long running = 0;
        for (int i = 0; i < _buckets.Length; i++)
        {
            running += Interlocked.Read(ref _buckets[i]);
            cumulative[i] = running;
        }
        return new HistogramSnapshot(_upperBounds, cumulative, BitConverter.Int64BitsToDouble(Volatile.Read(ref _sumBits)));
    }
}

/// <summary>
/// A histogram read at one moment. CumulativeCounts[i] counts values &lt;= UpperBounds[i]; the extra
/// last entry counts all values (the +Inf bucket, equal to <see cref="Count"/>).
/// </summary>
public sealed record HistogramSnapshot(IReadOnlyList<double> UpperBounds, IReadOnlyList<long> CumulativeCounts, double Sum)
{
    public long Count => CumulativeCounts[^1];
}
