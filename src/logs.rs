//! Log lines to stderr, written in batches by a background thread.
//!
//! A request's access line is appended to a shared buffer under a mutex and
//! the request moves on. The writer thread is woken once when the buffer
//! goes from empty to not empty, lets lines gather for [`BATCH_WINDOW`],
//! then writes them all with one `write`. Under load that is one wake-up
//! and one `write` per window instead of one per line: a per-line hand-off
//! (tracing-appender's, one channel send, futex wake and `write` per line,
//! on the same core as the requests) cost about a tenth of the gateway's
//! peak throughput.
//!
//! The buffer is bounded: past [`MAX_PENDING`] bytes lines are dropped and
//! counted, and the count is written with the next batch, so a stalled
//! stderr slows no request. Lines in the buffer when the process is killed
//! are lost (at most one window's worth); [`LogGuard`] flushes on drop.

use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

/// How long lines gather before a write.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Bytes waiting to be written, at most; later lines are dropped.
pub const MAX_PENDING: usize = 8 << 20;

struct Pending {
    bytes: Vec<u8>,
    dropped: u64,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    max_pending: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves a buffer of whole lines.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where `tracing_subscriber::fmt` writes: each event arrives as one
/// `write` of a whole line, appended to the shared buffer.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Keeps the writer thread; dropping it writes what is buffered and stops it.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer batching into `out` every `window`, holding at most
/// `max_pending` bytes.
pub fn batched<W: Write + Send + 'static>(out: W, window: Duration, max_pending: usize) -> std::io::Result<(BatchedWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            bytes: Vec::new(),
            dropped: 0,
            closed: false,
        }),
        ready: Condvar::new(),
        max_pending,
    });
    let thread = std::thread::Builder::new().name("log-writer".into()).spawn({
        let shared = shared.clone();
        move || {
            // Lines wait for an idle moment, not the requests for the lines.
            crate::background::lower_this_thread();
            write_batches(&shared, out, window)
        }
    })?;
    Ok((BatchedWriter { shared: shared.clone() }, LogGuard { shared, thread: Some(thread) }))
}

fn write_batches<W: Write>(shared: &Shared, mut out: W, window: Duration) {
    let mut batch = Vec::new();
    loop {
        let (dropped, closed) = {
            let mut p = shared.lock();
            while p.bytes.is_empty() && p.dropped == 0 && !p.closed {
                p = shared.ready.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            // Let the rest of the window's lines arrive (only closing
            // notifies while the buffer holds lines).
            let deadline = std::time::Instant::now() + window;
            while !p.closed {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                p = shared.ready.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
            }
            std::mem::swap(&mut batch, &mut p.bytes);
            (std::mem::take(&mut p.dropped), p.closed)
        };
        if dropped > 0 {
            let _ = writeln!(batch, "switchyard: {dropped} log lines dropped: stderr is not keeping up");
        }
        // A failing stderr loses lines; nothing else can be done with them.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > 1 << 20 {
            batch.shrink_to(1 << 20);
        }
        if closed {
            return;
        }
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let wake = {
            let mut p = self.shared.lock();
            let was_empty = p.bytes.is_empty() && p.dropped == 0;
            if p.bytes.len() + buf.len() > self.shared.max_pending {
                p.dropped += 1;
            } else {
                p.bytes.extend_from_slice(buf);
            }
            was_empty
        };
        // Only the first line of a batch wakes the writer.
        if wake {
            self.shared.ready.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink recording each `write_all` it is given.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.0.lock().unwrap().clone()
        }
        fn text(&self) -> String {
            String::from_utf8(self.writes().concat()).unwrap()
        }
    }

    fn wait_for(sink: &Sink, what: &str) {
        for _ in 0..500 {
            if sink.text().contains(what) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("{what:?} was never written; got {:?}", sink.text());
    }

    #[test]
    fn a_burst_of_lines_goes_out_in_order_in_one_write() {
        let sink = Sink::default();
        let (mut w, _guard) = batched(sink.clone(), Duration::from_millis(50), 1 << 20).unwrap();
        for i in 0..1000 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        wait_for(&sink, "line 999\n");
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(sink.text(), expected);
        // The thread slept the window after the first line; a burst
        // written well inside it arrives as one write (the sink's own
        // write_all calls `write` once per slice).
        assert_eq!(sink.writes().len(), 1, "one batch, one write");
    }

    #[test]
    fn dropping_the_guard_writes_what_is_buffered() {
        let sink = Sink::default();
        let (mut w, guard) = batched(sink.clone(), Duration::from_secs(3600), 1 << 20).unwrap();
        w.write_all(b"last words\n").unwrap();
        drop(guard);
        assert_eq!(sink.text(), "last words\n");
    }

    #[test]
    fn past_the_bound_lines_are_dropped_and_counted_never_waited_for() {
        let sink = Sink::default();
        let (mut w, guard) = batched(sink.clone(), Duration::from_secs(3600), 16).unwrap();
        w.write_all(b"0123456789\n").unwrap();
        w.write_all(b"too much\n").unwrap();
        w.write_all(b"and more\n").unwrap();
        drop(guard);
        assert_eq!(sink.text(), "0123456789\nswitchyard: 2 log lines dropped: stderr is not keeping up\n");
    }

    #[test]
    fn an_idle_writer_writes_nothing_and_a_later_line_still_arrives() {
        let sink = Sink::default();
        let (mut w, _guard) = batched(sink.clone(), Duration::from_millis(5), 1 << 20).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert!(sink.writes().is_empty());
        w.write_all(b"first\n").unwrap();
        wait_for(&sink, "first\n");
        w.write_all(b"second\n").unwrap();
        wait_for(&sink, "second\n");
        assert_eq!(sink.text(), "first\nsecond\n");
    }
}
