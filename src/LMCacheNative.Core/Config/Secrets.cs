using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace LMCacheNative.Core.Config;

/// <summary>
/// Hides credentials wherever configuration is printed or handed back: a URL's password (user info
/// after the colon) and the value of any key whose name says it is a secret. The engine keeps the
/// real values; only what leaves it as text is redacted.
/// </summary>
public static class Secrets
{
    public const string Mask = "***";

    // scheme://[user[:password]@]host... with comma-separated host lists allowed after the '@'.
    private static readonly Regex UrlUserInfo = new(@"(?<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?<user>[^:@/\s]*):(?<password>[^@/\s]*)@",
        RegexOptions.CultureInvariant);
    private static readonly Regex UrlPasswordOnly = new(@"(?<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?<password>[^:@/\s]+)@",
        RegexOptions.CultureInvariant);

    /// <summary><c>redis://user:pass@h:6379/0</c> becomes <c>redis://user:***@h:6379/0</c>; <c>redis://pass@h</c> becomes <c>redis://***@h</c>.</summary>
    public static string RedactUrls(string text)
    {
        string redacted = UrlUserInfo.Replace(text, m => $"{m.Groups["scheme"].Value}{m.Groups["user"].Value}:{Mask}@");
        return UrlPasswordOnly.Replace(redacted, m => m.Groups["password"].Value == Mask ? m.Value : $"{m.Groups["scheme"].Value}{Mask}@");
    }

    // A key is a secret when one of its words is one of these, or two adjacent words form one of the
    // phrases. Whole words, so that "min_retrieve_tokens" (a count) is not taken for "token".
    private static readonly HashSet<string> SecretWords = new(StringComparer.Ordinal)
    {
        "password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "auth", "authkey",
        "authentication", "authorization", "credential", "credentials", "apikey", "cookie",
    };
    private static readonly string[] SecretPhrases = ["api_key", "private_key", "access_key", "secret_key", "session_key", "client_key"];
    private static readonly Regex WordBoundary = new("(?<=[a-z0-9])(?=[A-Z])", RegexOptions.CultureInvariant);

    /// <summary>Whether a configuration key names a secret: <c>redis_password</c>, <c>authToken</c>, <c>API-KEY</c>, ….</summary>
    public static bool IsSecretKey(string key)
    {
        string[] words = WordBoundary.Replace(key, "_").ToLowerInvariant()
            .Split(['_', '-', '.', ' '], StringSplitOptions.RemoveEmptyEntries);
        if (words.Any(SecretWords.Contains)) return true;
        for (int i = 0; i + 1 < words.Length; i++)
            if (SecretPhrases.Contains(words[i] + "_" + words[i + 1])) return true;
        return false;
    }

    /// <summary>
    /// A JSON value with every secret-named member's value replaced by <see cref="Mask"/> and URLs
    /// redacted in every string, at any depth.
    /// </summary>
    public static string RedactJson(string json)
    {
        using var document = JsonDocument.Parse(json);
        using var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream))
            Write(writer, document.RootElement);
        return Encoding.UTF8.GetString(stream.ToArray());
    }

    private static void Write(Utf8JsonWriter writer, JsonElement value)
    {
        switch (value.ValueKind)
        {
            case JsonValueKind.Object:
                writer.WriteStartObject();
                foreach (var member in value.EnumerateObject())
                {
                    writer.WritePropertyName(member.Name);
                    if (IsSecretKey(member.Name) && member.Value.ValueKind is not (JsonValueKind.Null or JsonValueKind.Object or JsonValueKind.Array))
                        writer.WriteStringValue(Mask);
                    else
                        Write(writer, member.Value);
                }
                writer.WriteEndObject();
                break;
            case JsonValueKind.Array:
                writer.WriteStartArray();
                foreach (var item in value.EnumerateArray()) Write(writer, item);
                writer.WriteEndArray();
                break;
            case JsonValueKind.String:
                writer.WriteStringValue(RedactUrls(value.GetString()!));
                break;
            default:
                value.WriteTo(writer);
                break;
        }
    }
}
