//! Engine benchmark, same workload and output keys as the peer baselines
//! in the project's peer-bench: N tasks on a one-second schedule with no-op
//! bodies for S seconds, one node on the memory registry, a claim per fire.
//!
//! `cargo bench -p dcron --bench engine -- [N] [S]` (defaults 10000 20).
//! Lateness is the time from the scheduled fire time to the body's start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dcron::{Dcron, MemoryRegistry, TaskContext};

fn rusage() -> (f64, i64) {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(u.ru_utime) + t(u.ru_stime), u.ru_maxrss)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(10_000) as usize;
    let secs = args.get(1).copied().unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(n, secs));
}

async fn run(n: usize, secs: u64) {
    let fires = Arc::new(AtomicU64::new(0));
    let late = Arc::new(Mutex::new(Vec::<u32>::with_capacity(n * secs as usize)));
    let node = Dcron::builder(MemoryRegistry::new())
        .node_id("bench")
        .build()
        .expect("node");
    let (cpu0, _) = rusage();
    let t0 = Instant::now();
    for i in 0..n {
        let (fires, late) = (fires.clone(), late.clone());
        node.add_func(
            &format!("job-{i}"),
            "* * * * * *",
            move |ctx: TaskContext| {
                let (fires, late) = (fires.clone(), late.clone());
                async move {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    let us = (now.as_micros() as i64 - ctx.fire_time * 1000).max(0);
                    fires.fetch_add(1, Ordering::Relaxed);
                    late.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(us as u32);
                    Ok(())
                }
            },
        )
        .await
        .expect("add");
    }
    node.start().await.expect("start");
    let add_s = t0.elapsed().as_secs_f64();
    let (cpu_add, rss_add) = rusage();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (cpu1, rss1) = rusage();
    let f = fires.load(Ordering::Relaxed);
    let mut l = late.lock().unwrap_or_else(|p| p.into_inner()).clone();
    l.sort_unstable();
    let p = |q: f64| {
        if l.is_empty() {
            0
        } else {
            l[((l.len() - 1) as f64 * q) as usize]
        }
    };
    println!(
        "peer=dcron jobs={n} secs={secs} add_s={add_s:.2} add_cpu_s={:.2} rss_after_add_kb={rss_add} fires={f} fires_per_s={:.0} run_cpu_s={:.2} cpu_us_per_fire={:.1} peak_rss_kb={rss1} late_p50_us={} late_p99_us={} late_max_us={}",
        cpu_add - cpu0,
        f as f64 / secs as f64,
        cpu1 - cpu_add,
        (cpu1 - cpu_add) * 1e6 / f.max(1) as f64,
        p(0.5),
        p(0.99),
        p(1.0)
    );
    std::process::exit(0);
}
