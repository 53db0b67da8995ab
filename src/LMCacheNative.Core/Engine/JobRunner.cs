using System.Collections.Concurrent;

namespace LMCacheNative.Core.Engine;

/// <summary>
/// The engine's own worker threads for requests that run in the background (jobs): lookups,
/// lower-tier reads and host copies of asynchronous stores, retrieves and prefetches. Dedicated
/// threads, not the thread pool, so that a job waiting on a disk or a remote store never starves the
/// process's other work, and other work never delays a job. Jobs start in submission order.
/// </summary>
internal sealed class JobRunner : IDisposable
{
    private readonly BlockingCollection<Action> _queue = new(new ConcurrentQueue<Action>());
    private readonly Thread[] _threads;

    /// <param name="threads">jobs that may run at once (each may itself copy on several cores)</param>
    public JobRunner(int threads, string name)
    {
        _threads = new Thread[threads];
        for (int i = 0; i < threads; i++)
        {
            _threads[i] = new Thread(Run) { IsBackground = true, Name = name };
            _threads[i].Start();
        }
    }

    /// <summary>Runs <paramref name="work"/> on a worker; the task completes when the task it returns does.</summary>
    public Task<T> Submit<T>(Func<Task<T>> work)
    {
        var completion = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        _queue.Add(() =>
        {
            Task<T> started;
            try
            {
                started = work();
            }
            catch (Exception e)
            {
                completion.SetException(e);
                return;
            }
            started.ContinueWith(static (done, state) =>
            {
                var target = (TaskCompletionSource<T>)state!;
                if (done.IsCompletedSuccessfully) target.SetResult(done.Result);
                else target.SetException(done.Exception!.InnerExceptions);
            }, completion, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        });
        return completion.Task;
    }

    private void Run()
    {
        foreach (var job in _queue.GetConsumingEnumerable()) job();
    }

    /// <summary>Runs the jobs already submitted, then stops the threads.</summary>
    public void Dispose()
    {
        _queue.CompleteAdding();
        foreach (var thread in _threads) thread.Join();
        _queue.Dispose();
    }
}
