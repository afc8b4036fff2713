//! The ledger every task run appends to (`task fire_time node wall_ms`) and
//! its analysis against the expected fire times.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// One run: the task, its scheduled fire time, the node that ran it and
/// the wall clock when the command started (all epoch ms).
#[derive(Debug, Clone)]
pub struct Line {
    pub task: String,
    pub fire: i64,
    pub node: String,
    pub wall: i64,
}

/// Reads the ledger; a torn last line is ignored.
pub fn read(path: &Path) -> Vec<Line> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let line = Line {
                task: f.next()?.to_string(),
                fire: f.next()?.parse().ok()?,
                node: f.next()?.to_string(),
                wall: f.next()?.parse().ok()?,
            };
            f.next().is_none().then_some(line)
        })
        .collect()
}

/// A task and its period (every task fires on multiples of its period).
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub period: i64,
}

/// A stretch of the run, from `start`, whose fires may be late by the
/// `fault` injected at `start` (at least the claim deadline's 1 s when
/// there is one) plus one second.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub start: i64,
    pub fault: i64,
}

/// Fires of a phase are attributed to it from this long before its start:
/// a fire claimed just before the fault began is held up by it too.
pub const PHASE_LEAD_MS: i64 = 500;

/// A killed agent: its tasks' fires in `[kill, window_end]` are excluded
/// from the missing and lateness checks; `takeover` is when the watch saw
/// its registration go.
#[derive(Debug, Clone)]
pub struct Crash {
    pub node: String,
    pub kill: i64,
    pub window_end: i64,
    pub takeover: Option<i64>,
    pub tasks: BTreeSet<String>,
}

/// Fires excluded for another stated reason (a registry that lost its data).
#[derive(Debug, Clone)]
pub struct Excluded {
    pub why: String,
    pub tasks: BTreeSet<String>,
    pub from: i64,
    pub to: i64,
}

/// How close to the observed takeover a fire boundary makes the catch-up
/// check ambiguous (the nodes and the watch learn of the expiry at about
/// the same time, not at the same instant).
pub const TAKEOVER_SLACK_MS: i64 = 150;

/// Everything the analysis needs.
pub struct Run<'a> {
    pub backend: &'a str,
    pub lines: &'a [Line],
    pub specs: &'a [Spec],
    pub t0: i64,
    pub t_end: i64,
    pub phases: &'a [Phase],
    pub crashes: &'a [Crash],
    pub excluded: &'a [Excluded],
}

#[derive(Debug, Default)]
pub struct PhaseStat {
    pub name: String,
    pub bound: i64,
    pub fires: usize,
    pub max_late: i64,
}

#[derive(Debug, Default)]
pub struct Report {
    pub backend: String,
    pub expected: usize,
    pub ran: usize,
    /// fires in a crash window, and how many of them did not run
    pub crash_window: usize,
    pub crash_window_not_run: usize,
    /// fires of an `Excluded` span, and how many of them did not run
    pub wiped: usize,
    pub wiped_not_run: usize,
    /// (task, fire, nodes)
    pub duplicates: Vec<(String, i64, Vec<String>)>,
    /// (task, fire, phase)
    pub missing: Vec<(String, i64, String)>,
    /// lines whose fire time is not on their task's schedule, or of no task
    pub stray: Vec<Line>,
    pub catchup_total: usize,
    pub catchup_ok: usize,
    pub catchup_ambiguous: usize,
    pub catchup_max_late: i64,
    /// (task, candidate fire times)
    pub catchup_failed: Vec<(String, Vec<i64>)>,
    /// (node, takeover ms after the kill)
    pub takeovers: Vec<(String, Option<i64>)>,
    pub phases: Vec<PhaseStat>,
    /// (task, fire, node, lateness, phase, bound)
    pub late: Vec<(String, i64, String, i64, String, i64)>,
}

fn secs(ms: i64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

/// The expected fire times of `spec` in `[t0, t_end]`.
fn schedule(spec: &Spec, t0: i64, t_end: i64) -> impl Iterator<Item = i64> {
    let p = spec.period;
    let first = (t0 + p - 1).div_euclid(p) * p;
    (0..)
        .map(move |i| first + i * p)
        .take_while(move |f| *f <= t_end)
}

pub fn analyse(run: &Run) -> Report {
    let mut r = Report {
        backend: run.backend.to_string(),
        ..Report::default()
    };
    let period: BTreeMap<&str, i64> = run
        .specs
        .iter()
        .map(|s| (s.name.as_str(), s.period))
        .collect();
    let mut by_fire: BTreeMap<(&str, i64), Vec<&Line>> = BTreeMap::new();
    for l in run.lines {
        by_fire
            .entry((l.task.as_str(), l.fire))
            .or_default()
            .push(l);
        let on_schedule = period
            .get(l.task.as_str())
            .is_some_and(|p| l.fire.rem_euclid(*p) == 0);
        if !on_schedule && l.fire >= run.t0 && l.fire <= run.t_end {
            r.stray.push(l.clone());
        }
    }
    for ((task, fire), runs) in &by_fire {
        if runs.len() > 1 {
            r.duplicates.push((
                task.to_string(),
                *fire,
                runs.iter().map(|l| l.node.clone()).collect(),
            ));
        }
    }
    r.phases = run
        .phases
        .iter()
        .map(|p| PhaseStat {
            name: p.name.clone(),
            // A claim call in flight when the registry failed is given up
            // only at its deadline (at least 1 s), so a fault shorter than
            // that holds fires for the deadline, not for the fault.
            bound: if p.fault > 0 { p.fault.max(1000) } else { 0 } + 1000,
            ..PhaseStat::default()
        })
        .collect();
    let phase_of = |fire: i64| -> usize {
        run.phases
            .iter()
            .rposition(|p| p.start - PHASE_LEAD_MS <= fire)
            .unwrap_or(0)
    };
    for spec in run.specs {
        for fire in schedule(spec, run.t0, run.t_end) {
            r.expected += 1;
            let ran = by_fire.get(&(spec.name.as_str(), fire));
            if ran.is_some() {
                r.ran += 1;
            }
            let crashed = run
                .crashes
                .iter()
                .any(|c| c.tasks.contains(&spec.name) && c.kill <= fire && fire <= c.window_end);
            let wiped = run
                .excluded
                .iter()
                .any(|e| e.tasks.contains(&spec.name) && e.from <= fire && fire <= e.to);
            if crashed {
                r.crash_window += 1;
                r.crash_window_not_run += usize::from(ran.is_none());
                continue;
            }
            if wiped {
                r.wiped += 1;
                r.wiped_not_run += usize::from(ran.is_none());
                continue;
            }
            let pi = phase_of(fire);
            let Some(runs) = ran else {
                let name = run.phases.get(pi).map_or("?", |p| p.name.as_str());
                r.missing.push((spec.name.clone(), fire, name.to_string()));
                continue;
            };
            let first = runs.iter().min_by_key(|l| l.wall).expect("a run");
            let late = first.wall - fire;
            if let Some(stat) = r.phases.get_mut(pi) {
                stat.fires += 1;
                stat.max_late = stat.max_late.max(late);
                if late > stat.bound {
                    r.late.push((
                        spec.name.clone(),
                        fire,
                        first.node.clone(),
                        late,
                        stat.name.clone(),
                        stat.bound,
                    ));
                }
            }
        }
    }

    // Catch-up: for each task of a killed agent, the latest fire before the
    // takeover must have run (late, on a survivor). The takeover instant is
    // known to ±TAKEOVER_SLACK_MS, so every fire that is the latest one
    // before some instant of that interval is a candidate.
    for c in run.crashes {
        r.takeovers
            .push((c.node.clone(), c.takeover.map(|t| t - c.kill)));
        for task in &c.tasks {
            let Some(p) = period.get(task.as_str()).copied() else {
                continue;
            };
            let Some(take) = c.takeover else {
                r.catchup_total += 1;
                r.catchup_failed.push((task.clone(), Vec::new()));
                continue;
            };
            let (lo, hi) = (take - TAKEOVER_SLACK_MS, take + TAKEOVER_SLACK_MS);
            let spec = Spec {
                name: task.clone(),
                period: p,
            };
            let candidates: Vec<i64> = schedule(&spec, c.kill + 1, hi)
                .filter(|f| f + p > lo)
                .collect();
            if candidates.is_empty() {
                continue; // the takeover came before the task's next fire
            }
            r.catchup_total += 1;
            if candidates.len() > 1 {
                r.catchup_ambiguous += 1;
            }
            let ran: Vec<&Line> = candidates
                .iter()
                .filter_map(|f| by_fire.get(&(task.as_str(), *f)))
                .flatten()
                .filter(|l| l.node != c.node)
                .copied()
                .collect();
            if ran.is_empty() {
                r.catchup_failed.push((task.clone(), candidates));
            } else {
                r.catchup_ok += 1;
                let late = ran.iter().map(|l| l.wall - l.fire).max().unwrap_or(0);
                r.catchup_max_late = r.catchup_max_late.max(late);
            }
        }
    }
    r
}

pub const HEADER: &str = "backend | expected | ran | excluded: crash windows (not run), wiped registry (not run) | dup | missing | stray | caught_up (ambiguous, max late) | takeover after kill | max lateness per phase (max/bound)";

impl Report {
    pub fn row(&self) -> String {
        let takeovers: Vec<String> = self
            .takeovers
            .iter()
            .map(|(n, t)| format!("{n} {}", t.map_or("never".into(), secs)))
            .collect();
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("{} {}/{}", p.name, secs(p.max_late), secs(p.bound)))
            .collect();
        format!(
            "{} | {} | {} | {} ({}), {} ({}) | {} | {} | {} | {}/{} ({}, {}) | {} | {}",
            self.backend,
            self.expected,
            self.ran,
            self.crash_window,
            self.crash_window_not_run,
            self.wiped,
            self.wiped_not_run,
            self.duplicates.len(),
            self.missing.len(),
            self.stray.len(),
            self.catchup_ok,
            self.catchup_total,
            self.catchup_ambiguous,
            secs(self.catchup_max_late),
            takeovers.join(", "),
            phases.join(", ")
        )
    }

    /// What went wrong, with samples; empty when every check holds.
    pub fn failures(&self) -> String {
        let mut out = String::new();
        const N: usize = 25;
        if !self.duplicates.is_empty() {
            let _ = writeln!(
                out,
                "{} duplicate runs (task, fire_time, nodes):",
                self.duplicates.len()
            );
            for (t, f, n) in self.duplicates.iter().take(N) {
                let _ = writeln!(out, "  {t} {f} {n:?}");
            }
        }
        if !self.missing.is_empty() {
            let mut per_phase: BTreeMap<&str, usize> = BTreeMap::new();
            for (_, _, p) in &self.missing {
                *per_phase.entry(p.as_str()).or_default() += 1;
            }
            let _ = writeln!(
                out,
                "{} missing fires (per phase {per_phase:?}); (task, fire_time, phase):",
                self.missing.len()
            );
            for (t, f, p) in self.missing.iter().take(N) {
                let _ = writeln!(out, "  {t} {f} {p}");
            }
        }
        if !self.stray.is_empty() {
            let _ = writeln!(out, "{} runs off every schedule:", self.stray.len());
            for l in self.stray.iter().take(N) {
                let _ = writeln!(out, "  {l:?}");
            }
        }
        if !self.catchup_failed.is_empty() {
            let _ = writeln!(
                out,
                "{} tasks of a killed agent not caught up (task, candidate fire times):",
                self.catchup_failed.len()
            );
            for (t, c) in self.catchup_failed.iter().take(N) {
                let _ = writeln!(out, "  {t} {c:?}");
            }
        }
        if !self.late.is_empty() {
            let _ = writeln!(
                out,
                "{} fires over their lateness bound (task, fire_time, node, lateness, phase, bound):",
                self.late.len()
            );
            for (t, f, n, l, p, b) in self.late.iter().take(N) {
                let _ = writeln!(out, "  {t} {f} {n} {} {p} {}", secs(*l), secs(*b));
            }
        }
        out
    }
}
