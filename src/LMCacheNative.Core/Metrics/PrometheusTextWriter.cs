using System.Globalization;
using System.Text;

namespace LMCacheNative.Core.Metrics;

/// <summary>
/// Writes the Prometheus text exposition format, version 0.0.4
/// (https://prometheus.io/docs/instrumenting/exposition_formats/): one "# HELP" and one "# TYPE"
/// line per family, then its samples. Counters are named with their "_total" suffix in all three
/// places, as prometheus_client writes them; histograms write "_bucket{le=...}" (cumulative, "+Inf"
/// last), "_sum" and "_count". Every sample carries the common labels first, then its own.
/// </summary>
public sealed class PrometheusTextWriter
{
    private readonly StringBuilder _text = new(16 * 1024);
    private readonly string _commonLabels; // `name="value",...` without braces; may be empty

    /// <param name="commonLabels">label names and values put on every sample, in this order</param>
    public PrometheusTextWriter(IEnumerable<KeyValuePair<string, string>> commonLabels)
    {
        _commonLabels = FormatLabels(commonLabels);
    }

    /// <summary>A counter family with one sample (the "_total" suffix is added to <paramref name="name"/>).</summary>
    public void Counter(string name, string help, double value) =>
        Family(name + "_total", "counter", help, [(Array.Empty<KeyValuePair<string, string>>(), value)]);

    /// <summary>A counter family with one sample per extra label set.</summary>
    public void Counter(string name, string help, IEnumerable<(KeyValuePair<string, string>[] Labels, double Value)> samples) =>
        Family(name + "_total", "counter", help, samples);

    public void Gauge(string name, string help, double value) =>
        Family(name, "gauge", help, [(Array.Empty<KeyValuePair<string, string>>(), value)]);

    public void Gauge(string name, string help, IEnumerable<(KeyValuePair<string, string>[] Labels, double Value)> samples) =>
        Family(name, "gauge", help, samples);

    public void Histogram(string name, string help, HistogramSnapshot histogram)
    {
        Header(name, "histogram", help);
        for (int i = 0; i <= histogram.UpperBounds.Count; i++)
        {
            string le = i < histogram.UpperBounds.Count ? FormatBound(histogram.UpperBounds[i]) : "+Inf";
            Sample(name + "_bucket", [new("le", le)], histogram.CumulativeCounts[i]);
        }
        Sample(name + "_sum", [], histogram.Sum);
        Sample(name + "_count", [], histogram.Count);
    }

    public override string ToString() => _text.ToString();

    private void Family(string name, string type, string help, IEnumerable<(KeyValuePair<string, string>[] Labels, double Value)> samples)
    {
        Header(name, type, help);
        foreach (var (labels, value) in samples) Sample(name, labels, value);
    }

    private void Header(string name, string type, string help)
    {
        _text.Append("# HELP ").Append(name).Append(' ').Append(EscapeHelp(help)).Append('\n');
        _text.Append("# TYPE ").Append(name).Append(' ').Append(type).Append('\n');
    }

    private void Sample(string name, KeyValuePair<string, string>[] labels, double value)
    {
        _text.Append(name);
        string own = FormatLabels(labels);
        if (_commonLabels.Length > 0 || own.Length > 0)
        {
            _text.Append('{').Append(_commonLabels);
            if (_commonLabels.Length > 0 && own.Length > 0) _text.Append(',');
            _text.Append(own).Append('}');
        }
        _text.Append(' ').Append(FormatValue(value)).Append('\n');
    }

    private static string FormatLabels(IEnumerable<KeyValuePair<string, string>> labels) =>
        string.Join(",", labels.Select(l => l.Key + "=\"" + EscapeLabelValue(l.Value) + "\""));

    /// <summary>Integers exactly, other finite values round-trip, infinities as Prometheus spells them.</summary>
    public static string FormatValue(double value)
    {
        if (double.IsPositiveInfinity(value)) return "+Inf";
        if (double.IsNegativeInfinity(value)) return "-Inf";
        if (double.IsNaN(value)) return "NaN";
        if (value == Math.Floor(value) && Math.Abs(value) < 1e15) return ((long)value).ToString(CultureInfo.InvariantCulture);
        return value.ToString("R", CultureInfo.InvariantCulture);
    }

    /// <summary>
    /// A bucket bound as prometheus_client writes it (Python's repr: "0.001", "1e-05", "10.0"), so
    /// that the library's series and the vLLM connector's carry the same "le" values.
    /// </summary>
    public static string FormatBound(double bound)
    {
        string text = bound.ToString("R", CultureInfo.InvariantCulture).Replace("E", "e");
        if (text.Contains('e'))
        {
            // Python writes at least two exponent digits: 1e-05, 1e+16.
            int e = text.IndexOf('e');
            string mantissa = text[..e], exponent = text[(e + 1)..];
            char sign = exponent[0] == '-' ? '-' : '+';
            string digits = exponent.TrimStart('+', '-');
            return mantissa + "e" + sign + digits.PadLeft(2, '0');
        }
        return text.Contains('.') ? text : text + ".0";
    }

    /// <summary>Label values escape backslash, double quote and line feed (the format's three escapes).</summary>
    public static string EscapeLabelValue(string value) =>
        value.Replace("\\", "\\\\").Replace("\"", "\\\"").Replace("\n", "\\n");

    /// <summary>HELP text escapes backslash and line feed.</summary>
    public static string EscapeHelp(string help) => help.Replace("\\", "\\\\").Replace("\n", "\\n");
}
