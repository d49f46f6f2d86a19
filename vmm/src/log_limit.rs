//! A guest decides how often hull-vmm's devices warn (a malformed chain per request, a bad
//! CONNECT line per connection): each log call site gets at most `burst` lines per `window`,
//! and is quiet for the rest of it. Lifecycle lines, which happen once, are never held back.
//! (The runtime also caps the log file itself; this keeps the VMM from spending its time on
//! log lines a guest asked for.)

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::Metadata;
use tracing_subscriber::filter::{dynamic_filter_fn, DynFilterFn};
use tracing_subscriber::layer::Context;

/// The filter for hull-vmm's log layer. Dynamic: its answer for a call site changes, so it
/// is asked for every event (a plain `filter_fn` is asked once per call site and cached).
pub fn per_call_site<S>(burst: u32, window: Duration) -> DynFilterFn<S, impl Fn(&Metadata<'_>, &Context<'_, S>) -> bool> {
    let seen: Mutex<HashMap<Identifier, (Instant, u32)>> = Mutex::new(HashMap::new());
    dynamic_filter_fn(move |meta, _| {
        if !meta.is_event() {
            return true;
        }
        let Ok(mut seen) = seen.lock() else { return true };
        let now = Instant::now();
        let (start, count) = seen.entry(meta.callsite()).or_insert((now, 0));
        if now.duration_since(*start) >= window {
            (*start, *count) = (now, 0);
        }
        *count += 1;
        *count <= burst
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sink::Sink;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_flood_from_one_call_site_is_held_to_its_burst_and_others_still_log() {
        let lines = Sink::default();
        let out = lines.clone();
        let layer = tracing_subscriber::fmt::layer().with_writer(move || out.clone()).with_ansi(false);
        let subscriber = tracing_subscriber::registry().with(tracing_subscriber::Layer::with_filter(layer, per_call_site(5, Duration::from_secs(60))));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..10_000 {
                tracing::warn!(i, "virtio-net: malformed TX chain dropped");
            }
            tracing::info!("VM running");
        });
        let text = String::from_utf8(lines.bytes()).unwrap();
        assert_eq!(text.matches("malformed TX chain").count(), 5, "{text}");
        assert!(text.contains("VM running"), "{text}");
    }
}
