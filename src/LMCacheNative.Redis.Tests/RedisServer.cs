using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace LMCacheNative.Redis.Tests;

/// <summary>
/// A throw-away redis-server (Debian's package) on a free loopback port, with an append-only file
/// so that a restart keeps its data. Tests stop, pause and restart it to inject faults.
/// </summary>
public sealed class RedisServer : IDisposable
{
    private readonly string _directory = Path.Combine(Path.GetTempPath(), "lmcn-redis-" + Guid.NewGuid().ToString("N"));
    private Process? _process;

    public RedisServer()
    {
        Port = FreePort();
        Directory.CreateDirectory(_directory);
        Start();
    }

    public int Port { get; }
    public string Url => $"redis://127.0.0.1:{Port}/0";

    public static string? FindBinary() =>
        new[] { "/usr/bin/redis-server", "/usr/local/bin/redis-server" }.FirstOrDefault(File.Exists);

    public void Start()
    {
        string binary = FindBinary() ?? throw new InvalidOperationException("redis-server is not installed (./build.sh installs it)");
        _process = Process.Start(new ProcessStartInfo(binary,
            $"--port {Port} --bind 127.0.0.1 --save \"\" --appendonly yes --appendfsync always --dir {_directory} --daemonize no")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        })!;
        _process.OutputDataReceived += (_, _) => { };
        _process.BeginOutputReadLine();
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (DateTime.UtcNow < deadline)
        {
            try
            {
                using var client = new TcpClient();
                client.Connect(IPAddress.Loopback, Port);
                return;
            }
            catch (SocketException)
            {
                Thread.Sleep(20);
            }
        }
        throw new InvalidOperationException("redis-server did not start");
    }

    /// <summary>Stops the server gracefully (SIGTERM: the append-only file is complete).</summary>
    public void Stop()
    {
        if (_process is null) return;
        Process.Start("kill", $"-TERM {_process.Id}")!.WaitForExit();
        _process.WaitForExit(10_000);
        _process.Dispose();
        _process = null;
    }

    /// <summary>Freezes (SIGSTOP) or thaws (SIGCONT) the server: a hung peer that accepts nothing and answers nothing.</summary>
    public void Pause(bool paused) => Process.Start("kill", $"-{(paused ? "STOP" : "CONT")} {_process!.Id}")!.WaitForExit();

    private static int FreePort()
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int port = ((IPEndPoint)listener.LocalEndpoint).Port;
        listener.Stop();
        return port;
    }

    public void Dispose()
    {
        if (_process is not null)
        {
            try { Pause(false); } catch (Exception) { }
            try { _process.Kill(); _process.WaitForExit(5000); } catch (Exception) { }
            _process.Dispose();
        }
        try { Directory.Delete(_directory, true); } catch (Exception) { }
    }
}
