//! The commands that call the sidecar's Admin service: tenants (in
//! [`super::tenant`]), subjects, root keys and the audit log's head.

use std::path::PathBuf;

use clap::Subcommand;
use keywarden::{
    api::pb,
    client::{self, Connection},
};

use super::{
    CliError,
    shared::{AdminClient, save_receipt, time},
    tenant::TenantCommand,
};

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create, inspect, rotate and shred tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Erase one data subject.
    #[command(subcommand)]
    Subject(SubjectCommand),
    /// Operate on root keys.
    #[command(subcommand)]
    Root(RootCommand),
    /// Rotate, retire and list a tenant's blind-index key versions.
    #[command(subcommand)]
    IndexKey(IndexKeyCommand),
}

#[derive(Subcommand)]
pub enum IndexKeyCommand {
    /// Add a blind-index key version and make it the primary (admin:rotate).
    Rotate {
        #[arg(long)]
        tenant: String,
    },
    /// Destroy a non-primary blind-index key version (admin:rotate).
    /// Irreversible: tokens under it can no longer be computed.
    Retire {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        version: u32,
    },
    /// List the tenant's blind-index key versions (admin:read).
    List {
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand)]
pub enum SubjectCommand {
    /// Destroy one data subject's key. Irreversible.
    Shred {
        #[arg(long)]
        tenant: String,
        subject: String,
        /// Write the signed erasure receipt here [default: print it].
        #[arg(long)]
        receipt: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum RootCommand {
    /// Move every key of the shared-tier tenants of a region onto the shared
    /// root key configured now (set kms.key_id on every sidecar first).
    /// Resumable: run it again after an interruption.
    Rotate {
        /// The key to rotate to, as a safeguard: must be the configured one.
        #[arg(long, default_value = "")]
        to: String,
        /// The region; default: the default region.
        #[arg(long, default_value = "")]
        region: String,
        /// Keys per page.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
}

/// The Admin client of the sidecar the global options name.
async fn admin(connection: &Connection) -> Result<AdminClient, CliError> {
    let (channel, bearer) = super::connect(connection).await?;
    Ok(client::admin(channel, bearer))
}

pub async fn run(connection: &Connection, command: AdminCommand) -> Result<(), CliError> {
    let admin = admin(connection).await?;
    match command {
        AdminCommand::Tenant(command) => super::tenant::run(admin, command).await,
        AdminCommand::Subject(SubjectCommand::Shred {
            tenant,
            subject,
            receipt,
        }) => shred_subject(admin, tenant, subject, receipt).await,
        AdminCommand::Root(RootCommand::Rotate {
            to,
            region,
            page_size,
        }) => rotate_root(admin, to, region, page_size).await,
        AdminCommand::IndexKey(command) => index_key(admin, command).await,
    }
}

async fn index_key(mut admin: AdminClient, command: IndexKeyCommand) -> Result<(), CliError> {
    let keys = match command {
        IndexKeyCommand::Rotate { tenant } => {
            admin
                .rotate_index_key(pb::RotateIndexKeyRequest { tenant_id: tenant })
                .await?
        }
        IndexKeyCommand::Retire { tenant, version } => {
            admin
                .retire_index_key(pb::RetireIndexKeyRequest {
                    tenant_id: tenant,
                    version,
                })
                .await?
        }
        IndexKeyCommand::List { tenant } => {
            admin
                .get_index_keys(pb::GetIndexKeysRequest { tenant_id: tenant })
                .await?
        }
    }
    .into_inner();
    println!(
        "tenant: {}
primary index key version: {}",
        keys.tenant_id, keys.primary_version
    );
    for v in keys.versions {
        match v.retired_at {
            Some(at) => println!("  version {}: retired at {}", v.version, time(Some(at))),
            None => println!("  version {}: live, made {}", v.version, time(v.created_at)),
        }
    }
    Ok(())
}

/// `audit head`.
pub async fn audit_head(connection: &Connection) -> Result<(), CliError> {
    let head = admin(connection)
        .await?
        .get_audit_head(pb::GetAuditHeadRequest {})
        .await?
        .into_inner();
    println!(
        "records: {}\nhead:    {}\nreceipt key: {}",
        head.records, head.head, head.receipt_public_key
    );
    // What `audit verify --anchor` takes (the call is itself
    // recorded, so there is always a record to name).
    if head.records > 0 {
        println!("anchor:  {}:{}", head.records, head.head);
    }
    Ok(())
}

async fn shred_subject(
    mut admin: AdminClient,
    tenant: String,
    subject: String,
    receipt: Option<PathBuf>,
) -> Result<(), CliError> {
    let r = admin
        .shred_subject(pb::ShredSubjectRequest {
            tenant_id: tenant.clone(),
            subject_id: subject,
        })
        .await?
        .into_inner();
    let at = time(r.shredded_at);
    if r.already_shredded {
        println!("the subject was already shredded at {at} in tenant {tenant}");
    } else if r.key_destroyed {
        println!("shredded the subject's key in tenant {tenant} at {at}");
    } else {
        println!(
            "the subject had no key in tenant {tenant}; tombstoned at {at} so it never gets one"
        );
    }
    save_receipt(&r.receipt, receipt)
}

/// Follows a root key rotation with a progress bar (on a terminal) and
/// prints the outcome.
async fn rotate_root(
    mut admin: AdminClient,
    to: String,
    region: String,
    page_size: u32,
) -> Result<(), CliError> {
    let mut updates = admin
        .rotate_root_key(pb::RotateRootKeyRequest {
            region,
            to,
            page_size,
        })
        .await?
        .into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} keys ({eta} left)")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    let mut last = None;
    while let Some(update) = updates.message().await? {
        bar.set_length(update.total);
        bar.set_position(update.already_on_target + update.rewrapped + update.changed_concurrently);
        bar.set_message(format!("rotating to {}", update.to));
        last = Some(update);
    }
    bar.finish_and_clear();
    let Some(last) = last else {
        return Err(CliError::RotationSilent);
    };
    println!(
        "{}: {} of {} keys moved to {} now, {} were there already, {} changed concurrently",
        if last.done {
            "done"
        } else {
            "interrupted (run it again to resume)"
        },
        last.rewrapped,
        last.total,
        last.to,
        last.already_on_target,
        last.changed_concurrently
    );
    if last.done {
        Ok(())
    } else {
        Err(CliError::RotationInterrupted)
    }
}
