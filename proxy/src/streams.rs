//! An HTTP/2 connection's streams, run inside the connection's own task.
//!
//! hyper's HTTP/2 server hands each stream it accepts (and each upgraded stream's pipe) to its
//! executor. A task per stream costs a spawn per request: the task's allocation, the runtime's
//! bookkeeping, and a round through the scheduler for every wake between the connection and the
//! stream. Here the executor only queues what it is given; the connection's task adopts it into
//! a set it polls together with the connection (see [`Streams::poll_with`]), as Envoy runs all
//! of a connection's streams on the connection's worker. What a connection's streams still do
//! when the connection ends is finished before its task ends, so the drain waits for it too.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use parking_lot::Mutex;

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one connection: what it is given waits for the connection's task.
#[derive(Clone, Default)]
pub(crate) struct ConnExecutor(Arc<Queue>);

#[derive(Default)]
struct Queue {
    /// Set when `futures` may have some: the connection's polls read a flag, not a lock.
    any: AtomicBool,
    futures: Mutex<Vec<StreamFuture>>,
}

impl std::fmt::Debug for ConnExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnExecutor")
    }
}

impl<F> hyper::rt::Executor<F> for ConnExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        // Called while the connection (or a stream, for an upgrade's pipe) is being polled: the
        // lock is never held across a poll.
        self.0.futures.lock().push(Box::pin(future));
        self.0.any.store(true, Ordering::Release);
    }
}

/// The streams of one connection, polled by the connection's task.
#[derive(Default)]
pub(crate) struct Streams {
    new: ConnExecutor,
    /// Made when the first stream comes: HTTP/1.1 connections never have one.
    running: Option<FuturesUnordered<StreamFuture>>,
}

impl Streams {
    /// The executor to build the connection with.
    pub(crate) fn executor(&self) -> ConnExecutor {
        self.new.clone()
    }

    /// Polls the connection's future `conn` with the streams: the streams first (their answers
    /// are what the connection writes next), then the connection, and again while polling the
    /// connection started new streams (each is polled once before this returns pending).
    pub(crate) fn poll_with<F: Future + ?Sized>(
        &mut self,
        mut conn: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        loop {
            self.poll_running(cx);
            if let Poll::Ready(done) = conn.as_mut().poll(cx) {
                return Poll::Ready(done);
            }
            if !self.adopt() {
                return Poll::Pending;
            }
        }
    }

    /// Resolves once every stream has finished (after the connection ended).
    pub(crate) async fn finish(&mut self) {
        std::future::poll_fn(|cx| {
            loop {
                self.poll_running(cx);
                if !self.adopt() {
                    break;
                }
            }
            match &self.running {
                Some(running) if !running.is_empty() => Poll::Pending,
                _ => Poll::Ready(()),
            }
        })
        .await;
    }

    /// Moves the streams the executor was given into the running set; true when there were any.
    fn adopt(&mut self) -> bool {
        let queue = &self.new.0;
        if !queue.any.load(Ordering::Acquire) {
            return false;
        }
        queue.any.store(false, Ordering::Relaxed);
        let mut new = queue.futures.lock();
        if new.is_empty() {
            return false;
        }
        let running = self.running.get_or_insert_with(FuturesUnordered::new);
        for future in new.drain(..) {
            running.push(future);
        }
        true
    }

    /// Polls the streams that were woken (and new ones) until none is ready.
    fn poll_running(&mut self, cx: &mut Context<'_>) {
        if let Some(running) = &mut self.running {
            while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
        task::Waker,
    };

    use hyper::rt::Executor as _;

    use super::*;

    #[tokio::test]
    async fn streams_run_in_the_connection_task_and_are_finished_after_it() {
        let mut streams = Streams::default();
        let exec = streams.executor();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ran = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicBool::new(false));
        // A connection stand-in: starts a stream on its first poll, ends when told.
        let conn = {
            let (ran, ended) = (ran.clone(), ended.clone());
            let mut rx = Some(rx);
            std::future::poll_fn(move |_cx| {
                if let Some(rx) = rx.take() {
                    let (ran, inner) = (ran.clone(), exec.clone());
                    exec.execute(async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        // A stream that starts another, as an upgraded stream's pipe is started.
                        let ran2 = ran.clone();
                        inner.execute(async move {
                            ran2.fetch_add(10, Ordering::SeqCst);
                        });
                        let _ = rx.await;
                        ran.fetch_add(100, Ordering::SeqCst);
                    });
                }
                if ended.load(Ordering::SeqCst) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
        };
        tokio::pin!(conn);
        let mut cx = Context::from_waker(Waker::noop());
        // One poll of the connection runs what it started, and what that started, up to where
        // they wait.
        assert!(streams.poll_with(conn.as_mut(), &mut cx).is_pending());
        assert_eq!(ran.load(Ordering::SeqCst), 11);
        ended.store(true, Ordering::SeqCst);
        assert!(streams.poll_with(conn.as_mut(), &mut cx).is_ready());
        // The connection ended with a stream still waiting: it is finished before the task ends.
        let finishing = tokio::spawn(async move { streams.finish().await });
        tx.send(()).unwrap();
        finishing.await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 111);
    }
}
