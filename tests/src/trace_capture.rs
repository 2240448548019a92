//! A `tracing` layer that keeps what a test needs to check: every event with the chain of spans
//! it happened in, every closed span with its final fields, and every field value ever recorded
//! (to prove that a secret never reached any of them).
//!
//! [`install`] sets it as the process's global subscriber once, so that servers on other threads
//! (tokio workers, actix-web's worker systems) report to it; tests tell their records apart by
//! scope or marker.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A span as a test sees it: its name and fields.
#[derive(Debug, Clone, Default)]
pub struct SpanRecord {
    /// The span's name.
    pub name: String,
    /// Its fields, rendered with `Debug` (strings without quotes).
    pub fields: BTreeMap<String, String>,
    /// The name of its parent span, if any.
    pub parent: Option<String>,
}

/// An event and the spans it happened in, innermost first.
#[derive(Debug, Clone)]
pub struct EventRecord {
    /// The event's fields, its message included (`message`).
    pub fields: BTreeMap<String, String>,
    /// The spans it happened in, innermost first, as they were when it happened.
    pub scope: Vec<SpanRecord>,
}

/// Everything the layer kept.
#[derive(Debug, Default)]
pub struct Captured {
    /// Every event.
    pub events: Vec<EventRecord>,
    /// Every span, as it was when it closed.
    pub closed: Vec<SpanRecord>,
    /// Every field value recorded anywhere: on a span's creation, on a later `record`, on an
    /// event.
    pub values: Vec<String>,
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

struct Capture(Arc<Mutex<Captured>>);

impl Capture {
    fn keep(&self, fields: &Fields) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).values.extend(fields.0.values().cloned());
    }
}

impl<S> Layer<S> for Capture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        self.keep(&fields);
        if let Some(span) = ctx.span(id) {
            let parent = span.parent().map(|p| p.name().to_owned());
            let record = SpanRecord { name: span.name().to_owned(), fields: fields.0, parent };
            span.extensions_mut().insert(record);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        self.keep(&fields);
        if let Some(span) = ctx.span(id) {
            if let Some(record) = span.extensions_mut().get_mut::<SpanRecord>() {
                record.fields.extend(fields.0);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.keep(&fields);
        let scope = ctx
            .event_scope(event)
            .map(|scope| scope.filter_map(|span| span.extensions().get::<SpanRecord>().cloned()).collect())
            .unwrap_or_default();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).events.push(EventRecord { fields: fields.0, scope });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(record) = ctx.span(&id).and_then(|span| span.extensions().get::<SpanRecord>().cloned()) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).closed.push(record);
        }
    }
}

/// Installs the capturing layer as the global subscriber (once per process) and returns what it
/// has captured so far, shared.
pub fn install() -> Arc<Mutex<Captured>> {
    static CAPTURED: OnceLock<Arc<Mutex<Captured>>> = OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Arc::new(Mutex::new(Captured::default()));
            let subscriber = tracing_subscriber::registry().with(Capture(captured.clone()));
            tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber in this test");
            captured
        })
        .clone()
}
