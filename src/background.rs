//! Work no request waits for — the ledger writer, span export, the log
//! writer — runs on threads of its own, at a lower scheduling priority
//! than the threads serving requests.
//!
//! Why: that work comes in batches (a ledger flush is a few hundred rows,
//! every 50 ms under load). On the same core as the request runtime, a
//! thread waking with a batch preempted it, and every request in flight
//! waited out the batch: at half the gateway's peak rate the added p99 was
//! 5–10 ms, on a server whose median added latency is a few hundred µs.
//! At nice +10 a background thread still gets about a tenth of a busy core
//! (SQLite's share at full load is about a twentieth), so it keeps up, but
//! it runs when the request threads are idle instead of in their place.
//!
//! Threads inherit their creator's priority, so what a background thread
//! spawns (SQLite's per-connection worker, its runtime's blocking pool) is
//! background too.

use std::{future::Future, thread::JoinHandle};

/// How much nicer than the process a background thread is.
pub const NICENESS: i32 = 10;

/// Lowers the calling thread's priority by [`NICENESS`] (up to the lowest,
/// 19). Linux only, where the nice value is per thread; elsewhere the call
/// would lower the whole process, so it does nothing. Failure is harmless
/// (the thread keeps its priority) and only logged.
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let lowered = rustix::process::getpriority_process(None)
            .and_then(|nice| rustix::process::setpriority_process(None, (nice + NICENESS).min(19)));
        if let Err(e) = lowered {
            tracing::debug!("could not lower a background thread's priority: {e}");
        }
    }
}

/// Runs the future `make` returns on a new thread named `name`, at
/// background priority, on a single-threaded runtime of its own; the
/// thread ends when the future does.
pub fn spawn<F, Fut>(name: &str, make: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name(name.into()).spawn(move || {
        lower_this_thread();
        // `make` may spawn (a lazily connecting client does).
        let future = {
            let _inside = runtime.enter();
            make()
        };
        runtime.block_on(future);
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_background_thread_and_what_it_spawns_run_nicer_than_their_parent() {
        let parent = rustix::process::getpriority_process(None).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn("test-background", move || async move {
            let own = rustix::process::getpriority_process(None).unwrap();
            // A plain thread spawned from it, as SQLite's worker is.
            let child = std::thread::spawn(|| rustix::process::getpriority_process(None).unwrap()).join().unwrap();
            // Its runtime's blocking pool.
            let blocking = tokio::task::spawn_blocking(|| rustix::process::getpriority_process(None).unwrap()).await.unwrap();
            tx.send((own, child, blocking)).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
        let (own, child, blocking) = rx.recv().unwrap();
        let expected = (parent + NICENESS).min(19);
        assert_eq!((own, child, blocking), (expected, expected, expected));
        // The calling thread is untouched.
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), parent);
    }
}
