//! `dcron add / delete / reuse / cleanup`: changes made through the
//! library's [`Admin`], so its validation and writes are the only code
//! path (the same a node's task API takes).

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use chrono_tz::Tz;
use dcron::schedule::Schedule;
use dcron::task::validate_task_name;
use dcron::{Admin, Registry, TaskMeta};
use serde_json::json;

use crate::error::{CliError, CliResult};
use crate::output::{self, Format};

/// What `dcron add` was asked to store.
pub struct AddRequest {
    pub name: String,
    pub cron: String,
    pub payload: Option<String>,
    pub payload_file: Option<PathBuf>,
    pub one_shot: bool,
    pub delete_after_run: bool,
    pub cleanup_after_run: bool,
    pub force: bool,
    pub max_payload: usize,
}

impl AddRequest {
    /// Validates what can be validated without the registry (the library
    /// checks it all again before writing) and reads the payload.
    pub fn prepare(&self) -> CliResult<TaskMeta> {
        validate_task_name(&self.name)?;
        // The zone only matters for evaluation, not for validity.
        Schedule::parse(&self.cron, Tz::UTC)?;
        let payload = match (&self.payload, &self.payload_file) {
            (Some(p), None) => p.clone(),
            (None, Some(path)) => read_payload(path, self.max_payload)?,
            (None, None) => String::new(),
            (Some(_), Some(_)) => {
                return Err(CliError::invalid(
                    "use either --payload or --payload-file, not both",
                ))
            }
        };
        if payload.len() > self.max_payload {
            return Err(dcron::Error::PayloadTooLarge {
                size: payload.len(),
                limit: self.max_payload,
            }
            .into());
        }
        Ok(TaskMeta {
            name: self.name.clone(),
            cron_format: self.cron.clone(),
            one_shot: self.one_shot,
            executed_and_mark_deleted: self.delete_after_run,
            executed_and_cleanup: self.cleanup_after_run,
            payload,
        })
    }
}

/// Reads a payload from a file, or stdin for `-`, refusing more than
/// `limit` bytes without reading it all.
fn read_payload(path: &PathBuf, limit: usize) -> CliResult<String> {
    let shown = path.display();
    let mut bytes = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let read = if path.as_os_str() == "-" {
        std::io::stdin().lock().take(cap).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(cap).read_to_end(&mut bytes))
    };
    read.map_err(|e| CliError::invalid(format!("cannot read payload from {shown}: {e}")))?;
    if bytes.len() > limit {
        // A file's real size is known; of stdin, only that it is larger.
        return Err(match std::fs::metadata(path) {
            Ok(meta) if path.as_os_str() != "-" && meta.is_file() => dcron::Error::PayloadTooLarge {
                size: usize::try_from(meta.len()).unwrap_or(usize::MAX),
                limit,
            }
            .into(),
            _ => CliError::invalid(format!(
                "the payload on stdin is larger than the limit of {limit} bytes; store large data elsewhere and pass a reference"
            )),
        });
    }
    String::from_utf8(bytes)
        .map_err(|_| CliError::invalid(format!("payload from {shown} is not valid UTF-8")))
}

/// The task operations on namespace `ns`.
fn admin(registry: Arc<dyn Registry>, ns: &str) -> CliResult<Admin> {
    Ok(Admin::new(registry, ns)?)
}

fn done(format: Format, action: &str, name: &str, text: String) -> CliResult<()> {
    match format {
        Format::Json => output::print_json(&json!({"ok": true, "action": action, "task": name})),
        Format::Table => output::print(&format!("{text}\n")),
    }
}

/// `dcron add`.
pub async fn add(
    registry: Arc<dyn Registry>,
    ns: &str,
    req: &AddRequest,
    format: Format,
) -> CliResult<()> {
    let meta = req.prepare()?;
    let admin = admin(registry, ns)?.with_max_payload(req.max_payload);
    if req.force {
        admin.force_add_task(&meta).await?;
    } else {
        admin.add_task(&meta).await?;
    }
    let (name, cron) = (meta.name, meta.cron_format);
    let verb = if req.force {
        "stored (forced)"
    } else {
        "added"
    };
    done(
        format,
        "add",
        &name,
        format!("{verb} task `{name}` with schedule `{cron}` in namespace `{ns}`"),
    )
}

/// Whether any live node defines `name` statically, or it is a dynamic task.
async fn is_defined(admin: &Admin, name: &str) -> CliResult<bool> {
    let (tasks, nodes) = tokio::try_join!(admin.tasks(), admin.nodes())?;
    Ok(tasks.iter().any(|t| t.name == name)
        || nodes
            .iter()
            .any(|n| n.static_tasks.iter().any(|s| s == name)))
}

/// `dcron delete`: writes the tombstone.
pub async fn delete(
    registry: Arc<dyn Registry>,
    ns: &str,
    name: &str,
    format: Format,
) -> CliResult<()> {
    validate_task_name(name)?;
    let admin = admin(registry, ns)?;
    if !is_defined(&admin, name).await? {
        eprintln!(
            "note: no dynamic task `{name}` and no live node defining it; the name is marked deleted anyway"
        );
    }
    admin.mark_deleted(name).await?;
    done(
        format,
        "delete",
        name,
        format!("marked task `{name}` deleted; `dcron reuse {name}` revives it"),
    )
}

/// `dcron reuse`: removes the tombstone.
pub async fn reuse(
    registry: Arc<dyn Registry>,
    ns: &str,
    name: &str,
    format: Format,
) -> CliResult<()> {
    let admin = admin(registry, ns)?;
    if !admin.is_deleted(name).await? {
        return done(
            format,
            "reuse",
            name,
            format!("task `{name}` was not marked deleted; nothing changed"),
        );
    }
    admin.reuse_deleted(name).await?;
    done(
        format,
        "reuse",
        name,
        format!("task `{name}` is no longer marked deleted"),
    )
}

/// `dcron cleanup`: removes every trace of the task.
pub async fn cleanup(
    registry: Arc<dyn Registry>,
    ns: &str,
    name: &str,
    format: Format,
) -> CliResult<()> {
    admin(registry, ns)?.cleanup(name).await?;
    done(
        format,
        "cleanup",
        name,
        format!("removed task `{name}`: definition, deletion mark and last-run record"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_payload_file_is_reported_with_its_real_size() {
        let path = std::env::temp_dir().join(format!("dcron-payload-{}", std::process::id()));
        std::fs::write(&path, vec![b'x'; 70_000]).unwrap();
        let err = read_payload(&path, 65_536).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(err.message.contains("70000 bytes"), "{err}");
        assert!(err.message.contains("65536"), "{err}");
    }

    fn req(name: &str, cron: &str) -> AddRequest {
        AddRequest {
            name: name.into(),
            cron: cron.into(),
            payload: None,
            payload_file: None,
            one_shot: false,
            delete_after_run: false,
            cleanup_after_run: false,
            force: false,
            max_payload: 8,
        }
    }

    #[test]
    fn prepare_validates() {
        assert!(req("ok", "* * * * *").prepare().is_ok());
        assert_eq!(req("bad name", "* * * * *").prepare().unwrap_err().code, 2);
        assert_eq!(req("ok", "61 * * * *").prepare().unwrap_err().code, 2);
        let mut big = req("ok", "* * * * *");
        big.payload = Some("123456789".into());
        let err = big.prepare().unwrap_err();
        assert_eq!(err.code, 2);
        assert!(err.message.contains("exceeds"), "{err}");
    }

    #[tokio::test]
    async fn memory_round_trip() {
        let registry: Arc<dyn Registry> = Arc::new(dcron::MemoryRegistry::new());
        let mut r = req("job", "*/5 * * * * *");
        r.payload = Some("x".into());
        add(registry.clone(), "ns", &r, Format::Json).await.unwrap();
        let err = add(registry.clone(), "ns", &r, Format::Json)
            .await
            .unwrap_err();
        assert_eq!(err.code, 3, "{err}");
        delete(registry.clone(), "ns", "job", Format::Json)
            .await
            .unwrap();
        assert_eq!(
            registry.tombstones("ns").await.unwrap(),
            vec!["job".to_string()]
        );
        let err = add(registry.clone(), "ns", &r, Format::Json)
            .await
            .unwrap_err();
        assert_eq!(err.code, 3, "{err}");
        assert!(err.message.contains("dcron reuse job"), "{err}");
        reuse(registry.clone(), "ns", "job", Format::Json)
            .await
            .unwrap();
        assert!(registry.tombstones("ns").await.unwrap().is_empty());
        cleanup(registry.clone(), "ns", "job", Format::Json)
            .await
            .unwrap();
        assert!(registry.tasks("ns").await.unwrap().is_empty());
        let bad = add(
            registry.clone(),
            "ns",
            &req("x y", "* * * * *"),
            Format::Json,
        )
        .await;
        assert_eq!(bad.unwrap_err().code, 2);
        assert!(registry.tasks("ns").await.unwrap().is_empty());
    }
}
