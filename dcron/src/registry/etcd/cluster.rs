//! The members of the etcd cluster: one client per endpoint, connected on
//! first use, the member requests go to and how they move on, and the
//! leader probes that end an attempt stalled by a leader change.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Client, KvClient, LeaseClient};
use tokio::time::Instant;

use super::errors;
use super::retry::{Cause, Failure};
use super::{lock, EtcdRegistry, BACKEND};
use crate::error::{Error, RegistryErrorKind};

/// An attempt pending this long starts asking its member for its leader.
const PROBE_AFTER: Duration = Duration::from_millis(200);
/// How often a pending attempt's member is asked for its leader.
const PROBE_EVERY: Duration = Duration::from_millis(150);
/// Bound on one such question (answered locally by the member).
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// A member found unreachable is skipped this long when moving on.
const DOWN_FOR: Duration = Duration::from_secs(3);
/// Largest response accepted (a page of large task payloads).
const MAX_DECODING: usize = 64 * 1024 * 1024;

/// One member of the cluster.
pub(super) struct Member {
    endpoint: String,
    handles: Mutex<Option<Handles>>,
    /// Until when the member counts as unreachable (a transport error).
    down_until: Mutex<Option<Instant>>,
    /// The latest status probe of this member, shared by the requests
    /// waiting on it (one probe at a time).
    probe: tokio::sync::Mutex<Option<Probe>>,
}

impl Member {
    /// A member at `endpoint`, already connected if `client` is given.
    pub(super) fn new(endpoint: String, client: Option<Client>) -> Member {
        Member {
            endpoint,
            handles: Mutex::new(client.map(Handles::new)),
            down_until: Mutex::new(None),
            probe: tokio::sync::Mutex::new(None),
        }
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Marks the member unreachable for [`DOWN_FOR`] (skipped when moving
    /// on from another member), or reachable again.
    pub(super) fn set_down(&self, down: bool) {
        let mut until = lock(&self.down_until);
        if down {
            *until = Some(Instant::now() + DOWN_FOR);
        } else if until.is_some() {
            *until = None;
        }
    }

    pub(super) fn is_down(&self) -> bool {
        lock(&self.down_until).is_some_and(|until| until > Instant::now())
    }
}

/// What a member said about its leader.
#[derive(Clone, Copy)]
struct Probe {
    at: Instant,
    seen: Seen,
}

#[derive(Clone, Copy)]
enum Seen {
    /// It has a leader, in this raft term.
    Leader { term: u64 },
    /// It has no leader (an election is going on).
    NoLeader,
    /// No telling (slow, unreachable, or another error).
    Unknown,
}

/// The clients of one member.
#[derive(Clone)]
pub(super) struct Handles {
    pub client: Client,
    pub kv: KvClient,
    pub lease: LeaseClient,
}

impl Handles {
    fn new(client: Client) -> Self {
        Handles {
            kv: client.kv_client().max_decoding_message_size(MAX_DECODING),
            lease: client.lease_client(),
            client,
        }
    }
}

impl EtcdRegistry {
    /// The index of the member requests go to now.
    pub(super) fn current(&self) -> usize {
        self.shared.current.load(Ordering::Relaxed) % self.shared.members.len().max(1)
    }

    /// Moves on from member `index` (unless another request already did)
    /// to the next member not found unreachable lately (else the next).
    pub(super) fn rotate(&self, index: usize) {
        let members = &self.shared.members;
        let n = members.len();
        if n < 2 {
            return;
        }
        let next = (1..n)
            .map(|k| (index + k) % n)
            .find(|&j| !members[j].is_down())
            .unwrap_or((index + 1) % n);
        let moved =
            self.shared
                .current
                .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
        if moved.is_ok() {
            tracing::debug!(backend = BACKEND, from = %members[index].endpoint, to = %members[next].endpoint, "switching etcd member");
        }
    }

    /// The clients of member `index`, connecting it on first use.
    pub(super) async fn handles(&self, index: usize) -> Result<Handles, Failure> {
        let fail = |context: &str| Failure::new(Error::registry_msg(BACKEND, context));
        let Some(member) = self.shared.members.get(index) else {
            return Err(fail("no etcd member"));
        };
        if let Some(handles) = lock(&member.handles).clone() {
            return Ok(handles);
        }
        let Some(options) = self.shared.connect.clone() else {
            return Err(fail("no etcd client"));
        };
        let bound = self.shared.connect_bound;
        let endpoint = member.endpoint.as_str();
        let down = |error| Failure {
            error,
            cause: Cause::Down,
        };
        match tokio::time::timeout(bound, Client::connect([endpoint], Some(options))).await {
            Ok(Ok(client)) => {
                let mut slot = lock(&member.handles);
                // Another request may have connected meanwhile: keep one.
                Ok(slot.get_or_insert_with(|| Handles::new(client)).clone())
            }
            Ok(Err(err)) => Err(down(errors::convert(
                err,
                format!("cannot connect to etcd at {endpoint}"),
            ))),
            Err(_) => Err(down(Error::Timeout {
                what: format!("connecting to etcd at {endpoint}"),
                after: bound,
            })),
        }
    }

    /// Ends (with the failure to report) once member `index` has lost the
    /// leader it had when this started; never ends while that leader stays.
    pub(super) async fn watch_leader(&self, index: usize, handles: &Handles) -> Failure {
        let Some(member) = self.shared.members.get(index) else {
            return std::future::pending().await;
        };
        let lost = |context: String, cause| Failure {
            error: Error::registry_msg(BACKEND, context).with_kind(RegistryErrorKind::Unavailable),
            cause,
        };
        // The latest raft term any member answered in before this request
        // (terms are cluster-wide), or else the first probe's. A term that
        // moved on without us only costs one needless retry.
        let mut known = self.shared.term.load(Ordering::Relaxed);
        tokio::time::sleep(PROBE_AFTER).await;
        loop {
            match self.probe(member, handles).await.seen {
                Seen::NoLeader => {
                    return lost(
                        format!("{} lost its leader while the request was pending", member.endpoint),
                        Cause::Failed,
                    )
                }
                Seen::Leader { term } if known == 0 => known = term,
                Seen::Leader { term } if term > known => {
                    return lost(
                        format!("{} moved to raft term {term} while the request (sent in term {known}) was pending", member.endpoint),
                        Cause::Moved,
                    )
                }
                Seen::Leader { .. } | Seen::Unknown => {}
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Asks `member` for its leader, or returns a probe of the last
    /// [`PROBE_EVERY`] (requests waiting on one member share its probes).
    async fn probe(&self, member: &Member, handles: &Handles) -> Probe {
        let mut last = member.probe.lock().await;
        if let Some(probe) = *last {
            if probe.at.elapsed() < PROBE_EVERY / 2 {
                return probe;
            }
        }
        let mut maintenance = handles.client.maintenance_client();
        let seen = match tokio::time::timeout(PROBE_TIMEOUT, maintenance.status()).await {
            Ok(Ok(status)) if status.leader() != 0 => Seen::Leader {
                term: status.raft_term(),
            },
            Ok(Ok(_)) => Seen::NoLeader,
            // The probe itself requires a leader: "no leader" is an answer.
            Ok(Err(err)) if errors::is_no_leader(&err) => Seen::NoLeader,
            Ok(Err(_)) | Err(_) => Seen::Unknown,
        };
        if let Seen::Leader { term } = seen {
            self.shared.term.fetch_max(term, Ordering::Relaxed);
        }
        let probe = Probe {
            at: Instant::now(),
            seen,
        };
        *last = Some(probe);
        probe
    }
}
