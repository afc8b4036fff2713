//! Claim throughput of one registry client, for any backend: the registry
//! comes from the environment as a URL (`dcron::registry::connect`).
//!
//! ```text
//! DCRON_BENCH_REGISTRY=redis://127.0.0.1:6379 cargo bench -p dcron --features redis --bench claim
//! ```
//!
//! Default `memory://`. Prints `key=value` figures: claims per second taken
//! one by one (won, and lost to an existing watermark), in batches of 100
//! and of 5,000 (`claim_many`), and from 16 concurrent claimers.

use std::sync::Arc;
use std::time::Instant;

use dcron::registry::{Claim, ClaimOutcome, Registry};

const TASKS: usize = 100;
const ROUNDS: i64 = 20;
const BIG: usize = 5_000;
const BIG_ROUNDS: i64 = 3;
const CLAIMERS: usize = 16;

fn claim(fire_time: i64) -> Claim {
    Claim::new(fire_time, "bench", "bench/1", fire_time)
}

fn per_second(claims: usize, started: Instant) -> f64 {
    claims as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let url = std::env::var("DCRON_BENCH_REGISTRY").unwrap_or_else(|_| "memory://".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(err) = rt.block_on(run(&url)) {
        eprintln!(
            "claim bench against {}: {err}",
            dcron::registry::redact(&url)
        );
        std::process::exit(1);
    }
}

async fn run(url: &str) -> dcron::Result<()> {
    let r = dcron::registry::connect(url).await?;
    let ns = format!("bench-claim-{}", std::process::id());
    let names: Vec<String> = (0..TASKS).map(|i| format!("task-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();

    let started = Instant::now();
    for round in 0..ROUNDS {
        for name in &refs {
            assert!(r.claim(&ns, name, &claim(10 + round)).await?);
        }
    }
    let sequential = per_second(TASKS * ROUNDS as usize, started);

    let started = Instant::now();
    for name in &refs {
        assert!(!r.claim(&ns, name, &claim(10)).await?);
    }
    let losing = per_second(TASKS, started);

    let started = Instant::now();
    for round in 0..ROUNDS {
        all_won(r.claim_many(&ns, &refs, &claim(1_000 + round)).await);
    }
    let batched = per_second(TASKS * ROUNDS as usize, started);

    let big: Vec<String> = (0..BIG).map(|i| format!("big-{i}")).collect();
    let big_refs: Vec<&str> = big.iter().map(String::as_str).collect();
    let started = Instant::now();
    for round in 0..BIG_ROUNDS {
        all_won(r.claim_many(&ns, &big_refs, &claim(5_000 + round)).await);
    }
    let batched_big = per_second(BIG * BIG_ROUNDS as usize, started);

    let started = Instant::now();
    let mut joins = Vec::new();
    for c in 0..CLAIMERS {
        let (r, ns, names): (Arc<dyn Registry>, _, _) = (r.clone(), ns.clone(), names.clone());
        joins.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                for name in names.iter().skip(c).step_by(CLAIMERS) {
                    r.claim(&ns, name, &claim(100_000 + round)).await?;
                }
            }
            dcron::Result::Ok(())
        }));
    }
    for join in joins {
        join.await.expect("claimer task")?;
    }
    let concurrent = per_second(TASKS * ROUNDS as usize, started);
    r.clear(&ns).await?;

    println!(
        "backend={} claim_seq_per_s={sequential:.0} claim_lost_per_s={losing:.0} \
         claim_many_{TASKS}_per_s={batched:.0} claim_many_{BIG}_per_s={batched_big:.0} \
         claim_{CLAIMERS}_concurrent_per_s={concurrent:.0}",
        r.backend()
    );
    Ok(())
}

fn all_won(outcomes: Vec<ClaimOutcome>) {
    assert!(outcomes.iter().all(ClaimOutcome::is_won), "{outcomes:?}");
}
