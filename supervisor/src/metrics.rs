//! The Prometheus text exposition (format 0.0.4, names as OpenMetrics wants
//! them: units in the name, `_total` on counters) of a status snapshot:
//! what `--metrics` serves at `GET /metrics`. Pure: the status in, the
//! text out.

use std::fmt::Write;

use crate::control::{HistogramStatus, Status, WorkerStatus};

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family being written: its HELP and TYPE, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

fn family<'a>(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out, name }
}

/// A histogram family: cumulative `_bucket`s up to `+Inf`, `_sum`, `_count`.
fn histogram(out: &mut String, name: &'static str, help: &str, h: &HistogramStatus) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (le, n) in h.le_secs.iter().zip(&h.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_secs);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

/// A label value as the format wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A per-worker gauge: its name, type, help, and its value for a worker.
type PerWorker = (&'static str, &'static str, &'static str, fn(&WorkerStatus) -> Option<f64>);

/// The exposition of `s`.
pub fn render(s: &Status) -> String {
    let mut out = String::with_capacity(4096);
    let o = &mut out;
    family(o, "monodon_info", "gauge", "The supervisor's version (the value is 1).")
        .sample(&[("version", &s.version)], 1.0);
    family(o, "monodon_uptime_seconds", "gauge", "Time since the supervisor started.")
        .sample(&[], s.uptime_secs);
    family(o, "monodon_serving_generation", "gauge", "The generation connections are dispatched to.")
        .sample(&[], s.generation as f64);

    let c = &s.connections;
    family(o, "monodon_connections", "gauge", "Client connections the supervisor holds, by state.")
        .sample(&[("state", "idle")], c.idle as f64)
        .sample(&[("state", "reading_head")], c.reading_head as f64)
        .sample(&[("state", "queued")], c.queued as f64)
        .sample(&[("state", "in_worker")], c.in_workers as f64)
        .sample(&[("state", "warm")], c.warm as f64)
        .sample(&[("state", "lingering")], c.lingering as f64);

    let w = &s.workers;
    family(o, "monodon_workers_target", "gauge", "Workers wanted per generation.")
        .sample(&[], w.target as f64);
    let mut generations: std::collections::BTreeSet<u64> =
        s.generations.iter().map(|g| g.generation).collect();
    generations.extend(s.worker_list.iter().map(|w| w.generation));
    let mut by_state = family(o, "monodon_workers", "gauge", "Worker processes, by generation and state.");
    for generation in generations {
        let label = generation.to_string();
        for state in ["starting", "idle", "busy", "retiring"] {
            let n = s.worker_list.iter().filter(|w| w.generation == generation && w.state == state).count();
            by_state.sample(&[("generation", &label), ("state", state)], n as f64);
        }
    }

    let t = &s.totals;
    family(o, "monodon_accepted_connections_total", "counter", "Client connections accepted.")
        .sample(&[], t.accepted as f64);
    family(o, "monodon_requests_total", "counter", "Requests workers have completed.")
        .sample(&[], t.requests as f64);
    family(o, "monodon_reloads_total", "counter", "Reloads begun (SIGHUP, monodon reload).")
        .sample(&[], t.reloads as f64);
    family(
        o,
        "monodon_reload_failures_total",
        "counter",
        "Reloads abandoned (the old generation serves on).",
    )
    .sample(&[], t.failed_reloads as f64);
    family(
        o,
        "monodon_accepted_by_workers_total",
        "counter",
        "Client connections workers accepted themselves.",
    )
    .sample(&[], t.accepted_by_workers as f64);
    family(
        o,
        "monodon_handed_over_total",
        "counter",
        "Connections the supervisor handed to workers, one per Assign.",
    )
    .sample(&[], t.handed_over as f64);
    family(o, "monodon_worker_respawns_total", "counter", "Workers replaced after an unexpected exit.")
        .sample(&[], t.respawns as f64);
    family(o, "monodon_worker_timeouts_total", "counter", "Workers killed for running past --timeout.")
        .sample(&[], t.timeouts as f64);
    let mut recycled = family(o, "monodon_workers_recycled_total", "counter", "Workers recycled, by cause.");
    for cause in ["max-requests", "max-worker-age", "max-worker-memory"] {
        recycled.sample(&[("cause", cause)], t.recycled.get(cause).copied().unwrap_or(0) as f64);
    }

    let mut responses = family(
        o,
        "monodon_responses_total",
        "counter",
        "Responses sent, by status class and by who answered.",
    );
    for (answered_by, counts) in [("worker", &t.worker_responses), ("supervisor", &t.supervisor_responses)] {
        for (class, n) in counts {
            responses.sample(&[("class", class), ("answered_by", answered_by)], *n as f64);
        }
    }
    histogram(
        o,
        "monodon_request_duration_seconds",
        "How long workers took over requests, from a complete head to the response's last byte.",
        &t.request_duration,
    );
    histogram(
        o,
        "monodon_queue_wait_seconds",
        "How long complete requests waited in the supervisor for a worker.",
        &t.queue_wait,
    );

    let start = &s.worker_start;
    family(o, "monodon_worker_start_p50_seconds", "gauge", "Median time from a worker's start to its Ready.")
        .sample(&[], start.p50_ms / 1e3);
    family(o, "monodon_worker_start_p99_seconds", "gauge", "99th percentile of a worker's start to Ready.")
        .sample(&[], start.p99_ms / 1e3);

    let mut held = family(
        o,
        "monodon_generation_limits_held",
        "gauge",
        "1 while the generation cannot make workers, so its workers serve past their max-requests.",
    );
    for g in &s.generations {
        held.sample(&[("generation", &g.generation.to_string())], f64::from(u8::from(g.limits_held)));
    }
    let mut template_up =
        family(o, "monodon_template_ready", "gauge", "1 while the generation's template is ready to fork.");
    for g in &s.generations {
        if let Some(t) = &g.template {
            let ready = f64::from(u8::from(t.state == "ready"));
            template_up.sample(&[("generation", &g.generation.to_string())], ready);
        }
    }
    let mut restarts = family(
        o,
        "monodon_template_restarts_total",
        "counter",
        "Times the generation's template was started again.",
    );
    for g in &s.generations {
        if let Some(t) = &g.template {
            restarts.sample(&[("generation", &g.generation.to_string())], f64::from(t.restarts));
        }
    }

    let per_worker: [PerWorker; 4] = [
        ("monodon_worker_requests", "gauge", "Requests this worker process has completed.", |w| {
            Some(w.requests as f64)
        }),
        ("monodon_worker_age_seconds", "gauge", "Time since the worker started.", |w| Some(w.age_secs)),
        (
            "monodon_worker_private_memory_bytes",
            "gauge",
            "Memory only this worker uses (smaps_rollup).",
            |w| w.private_kib.map(|k| k as f64 * 1024.0),
        ),
        (
            "monodon_worker_shared_memory_bytes",
            "gauge",
            "Memory this worker shares with others, its template's pages among them (smaps_rollup).",
            |w| w.shared_kib.map(|k| k as f64 * 1024.0),
        ),
    ];
    for (name, kind, help, value) in per_worker {
        let mut f = family(o, name, kind, help);
        for w in &s.worker_list {
            if let Some(v) = value(w) {
                let (pid, generation) = (w.pid.to_string(), w.generation.to_string());
                f.sample(&[("pid", &pid), ("generation", &generation)], v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{GenerationStatus, TemplateStatus};

    #[test]
    fn every_family_has_help_and_type_and_labels_are_escaped() {
        let mut s = Status { version: "1.0 \"x\"\\".into(), ..Default::default() };
        s.totals.recycled.insert("max-requests".into(), 7);
        s.generations.push(GenerationStatus {
            generation: 3,
            template: Some(TemplateStatus { pid: Some(9), state: "ready".into(), restarts: 2 }),
            ..Default::default()
        });
        s.worker_list.push(WorkerStatus {
            pid: 42,
            generation: 3,
            requests: 5,
            state: "busy".into(),
            ..Default::default()
        });
        s.totals.worker_responses = crate::control::by_class(&[0, 9, 0, 1, 0]);
        let mut took = monodon_proto::histogram::Histogram::default();
        took.observe(std::time::Duration::from_micros(300));
        took.observe(std::time::Duration::from_secs(20));
        s.totals.request_duration = (&took).into();
        let text = render(&s);
        assert!(text.contains("monodon_responses_total{class=\"2xx\",answered_by=\"worker\"} 9\n"), "{text}");
        assert!(text.contains("monodon_request_duration_seconds_bucket{le=\"0.00025\"} 0\n"), "{text}");
        assert!(text.contains("monodon_request_duration_seconds_bucket{le=\"0.0005\"} 1\n"), "{text}");
        assert!(text.contains("monodon_request_duration_seconds_bucket{le=\"10\"} 1\n"), "{text}");
        assert!(text.contains("monodon_request_duration_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("monodon_request_duration_seconds_sum 20.0003\n"), "{text}");
        assert!(text.contains("monodon_request_duration_seconds_count 2\n"), "{text}");
        assert!(text.contains(r#"monodon_info{version="1.0 \"x\"\\"} 1"#), "{text}");
        assert!(text.contains("monodon_workers_recycled_total{cause=\"max-requests\"} 7\n"), "{text}");
        assert!(text.contains("monodon_template_restarts_total{generation=\"3\"} 2\n"), "{text}");
        assert!(text.contains("monodon_workers{generation=\"3\",state=\"busy\"} 1\n"), "{text}");
        assert!(text.contains("monodon_workers{generation=\"3\",state=\"idle\"} 0\n"), "{text}");
        assert!(text.contains("monodon_worker_requests{pid=\"42\",generation=\"3\"} 5\n"), "{text}");
        // No memory read: no memory sample, but the family is declared.
        assert!(!text.contains("monodon_worker_private_memory_bytes{"), "{text}");
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap_or_default().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix).filter(|f| declared.contains(*f)))
                    .unwrap_or(name);
                assert!(declared.contains(family), "{name} has no TYPE before it");
            }
        }
    }
}
