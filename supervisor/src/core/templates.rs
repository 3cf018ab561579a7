//! Each generation's template (`--spawn template`): its lifecycle, what it
//! means for making workers (orders only once it is ready), its back-off
//! when it dies, and letting it go with its generation. The shell holds its
//! process and channel; the decisions are here.

use std::collections::BTreeMap;
use std::time::Instant;

use log::{info, warn};

use super::{Action, Core, Named, Peer, Stopping};
use crate::sched::Backoff;

/// Where a generation's template is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateLife {
    /// Started; its app is loading. No worker can be made yet.
    Starting,
    Ready,
    /// Gone (died, broken, or could not be started): started again at
    /// `retry_at`. Meanwhile its generation serves with the workers it has.
    Down {
        retry_at: Instant,
    },
}

/// A generation's template, as the core sees it.
#[derive(Debug, Clone)]
pub struct Template {
    pub life: TemplateLife,
    /// Times it was started again after going down.
    pub restarts: u32,
    backoff: Backoff,
}

/// The templates of the generations that have one, by generation.
pub(super) type Templates = BTreeMap<u64, Template>;

/// What making the next worker of a generation takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Make {
    /// Exec it from the generation's command (`--spawn exec`).
    Exec,
    /// Fork it from the generation's ready template.
    Fork,
    /// Start the generation's template first (from its command); the worker
    /// is ordered once the template is ready.
    StartTemplate,
}

impl<C: Peer, W: Named> Core<C, W> {
    pub fn template(&self, generation: u64) -> Option<&Template> {
        self.templates.get(&generation)
    }

    /// How a worker of `generation` can be made now; `None`: not now (its
    /// template is loading, or backing off).
    pub(super) fn make_for(&self, generation: u64, uses_template: bool, now: Instant) -> Option<Make> {
        if !uses_template {
            return Some(Make::Exec);
        }
        match self.templates.get(&generation).map(|t| t.life) {
            None => Some(Make::StartTemplate),
            Some(TemplateLife::Ready) => Some(Make::Fork),
            Some(TemplateLife::Starting) => None,
            Some(TemplateLife::Down { retry_at }) => (now >= retry_at).then_some(Make::StartTemplate),
        }
    }

    /// The live generation whose template is down and due to be started
    /// again, if any (not while stopping).
    pub(super) fn template_due(&self, now: Instant) -> Option<u64> {
        if self.stopping != Stopping::No {
            return None;
        }
        self.templates.iter().find_map(|(&g, t)| match t.life {
            TemplateLife::Down { retry_at } if now >= retry_at && self.is_live_generation(g) => Some(g),
            _ => None,
        })
    }

    /// When a template that is down is due to be started again.
    pub(super) fn template_retry_at(&self) -> Option<Instant> {
        if self.stopping != Stopping::No {
            return None;
        }
        self.templates
            .values()
            .filter_map(|t| match t.life {
                TemplateLife::Down { retry_at } => Some(retry_at),
                _ => None,
            })
            .min()
    }

    /// The earliest a worker of the serving generation can be made, given
    /// its template: `None` while it loads (its Ready will come).
    pub(super) fn template_wake(&self, due: Instant) -> Option<Instant> {
        if !self.settings.templates {
            return Some(due);
        }
        match self.templates.get(&self.serving).map(|t| t.life) {
            Some(TemplateLife::Starting) => None,
            Some(TemplateLife::Down { retry_at }) => Some(due.max(retry_at)),
            Some(TemplateLife::Ready) | None => Some(due),
        }
    }

    /// The shell started the template of `generation` (for a `StartTemplate`).
    pub fn template_started(&mut self, generation: u64) {
        let t = self.templates.entry(generation).or_insert_with(|| Template {
            life: TemplateLife::Starting,
            restarts: 0,
            backoff: Backoff::default(),
        });
        if matches!(t.life, TemplateLife::Down { .. }) {
            t.restarts += 1;
        }
        t.life = TemplateLife::Starting;
    }

    /// The template of `generation` has loaded the app: workers can be forked.
    /// Its back-off is kept until a worker it forked comes ready: a template
    /// that loads and then dies at every Fork must not be restarted ten
    /// times a second for ever.
    pub fn template_ready(&mut self, generation: u64) {
        if let Some(t) = self.templates.get_mut(&generation) {
            if t.life == TemplateLife::Starting {
                t.life = TemplateLife::Ready;
                self.hold_limits(generation, false);
            }
        }
    }

    /// A worker forked from `generation`'s template is ready: the template
    /// works, and its next failure starts the back-off afresh.
    pub(super) fn template_proved(&mut self, generation: u64) {
        if let Some(t) = self.templates.get_mut(&generation) {
            if t.life == TemplateLife::Ready {
                t.backoff = Backoff::default();
            }
        }
    }

    /// While `generation` cannot make workers (`hold`), those it has do not
    /// retire at their max-requests limit: a degraded generation keeps
    /// serving with all of them. Says so once per change.
    pub(super) fn hold_limits(&mut self, generation: u64, hold: bool) {
        let serving = self.serving;
        self.limits_held.retain(|&g| g >= serving);
        let changed =
            if hold { self.limits_held.insert(generation) } else { self.limits_held.remove(&generation) };
        if !changed {
            return;
        }
        if hold {
            warn!(
                "generation {generation} cannot make workers: its workers serve on past their max-requests"
            );
        } else {
            info!("generation {generation} can make workers again: max-requests applies");
        }
        self.act(Action::HoldLimits { generation, hold });
    }

    /// Whether `generation`'s workers are held past their limit.
    pub fn limits_held(&self, generation: u64) -> bool {
        self.limits_held.contains(&generation)
    }

    /// The template of `generation` is gone (it died, broke, or could not be
    /// started): started again after a back-off, while its workers serve.
    /// One that never got ready fails its generation's start (a reload is
    /// abandoned; the serving generation backs off).
    pub fn template_down(&mut self, generation: u64, why: &str, now: Instant) {
        if !self.is_live_generation(generation) {
            self.templates.remove(&generation);
            return;
        }
        let t = self.templates.entry(generation).or_insert_with(|| Template {
            life: TemplateLife::Starting,
            restarts: 0,
            backoff: Backoff::default(),
        });
        let was_ready = t.life == TemplateLife::Ready;
        let delay = t.backoff.on_spawn_failure();
        t.life = TemplateLife::Down { retry_at: now + delay };
        // Serving, or about to: its workers are all it has for now.
        self.hold_limits(generation, true);
        warn!("the template of generation {generation} is gone ({why}); its workers keep serving; next start in {delay:?}");
        if !was_ready {
            self.generation_failed(generation, &format!("its template failed: {why}"), now);
        }
    }

    /// A generation that serves or is starting. (A graceful stop keeps the
    /// serving one's template: a worker that retires meanwhile is replaced
    /// while requests wait.)
    fn is_live_generation(&self, generation: u64) -> bool {
        self.stopping != Stopping::Fast
            && (generation == self.serving
                || self.reload.as_ref().is_some_and(|r| r.generation == generation))
    }

    /// Lets go of the templates of generations that no longer serve or start.
    pub(super) fn release_templates(&mut self) {
        let over: Vec<u64> =
            self.templates.keys().copied().filter(|&g| !self.is_live_generation(g)).collect();
        for generation in over {
            self.templates.remove(&generation);
            info!("letting go of the template of generation {generation}");
            self.act(Action::ReleaseTemplate { generation });
        }
    }
}
