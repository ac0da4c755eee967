//! `keywarden tenant`: create, inspect, rotate and shred tenants.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use keywarden::api::pb;

use super::{
    CliError,
    shared::{AdminClient, save_receipt, time},
};

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant with key version 1.
    Create {
        id: String,
        /// "dedicated" for a KMS key of its own, or an existing KMS key id,
        /// ARN or alias; default: the shared root key of its region.
        #[arg(long, default_value = "")]
        root_key: String,
        /// The region whose root keys wrap its keys; default: the default region.
        #[arg(long, default_value = "")]
        region: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Replace a tenant's policy (unset flags become "not set").
    Policy {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Show a tenant, its key versions and state.
    Show { id: String },
    /// List every tenant.
    List {
        /// Tenants fetched per request.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Add a key version and make it primary.
    Rotate { id: String },
    /// Destroy every key of a tenant. Irreversible.
    Shred {
        id: String,
        /// The tenant id again, to confirm.
        #[arg(long)]
        confirm: String,
        /// Write the signed erasure receipt here [default: print it].
        #[arg(long)]
        receipt: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct PolicyArgs {
    /// Rotate the tenant key automatically this often (e.g. 90d).
    #[arg(long, value_parser = humantime::parse_duration)]
    rotation_period: Option<std::time::Duration>,
    /// Destroy key versions this old (e.g. 365d): their data becomes unreadable.
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<std::time::Duration>,
    /// Refuse to decrypt data of key versions older than this.
    #[arg(long, default_value_t = 0)]
    min_decrypt_version: u32,
    /// Items per second on each sidecar (0: the sidecar's default).
    #[arg(long, default_value_t = 0)]
    max_items_per_second: u32,
    /// Items at once above the rate (0: one second's worth).
    #[arg(long, default_value_t = 0)]
    burst: u32,
    /// Largest plaintext per item, in bytes (0: the sidecar's limit).
    #[arg(long, default_value_t = 0)]
    max_plaintext_bytes: u64,
    /// How subject ids are told apart: exact, nfc or nfc-casefold. Chosen at
    /// creation, fixed after (omitted on `tenant policy`: kept).
    #[arg(long, default_value = "")]
    subject_ids: String,
    /// Most subject keys the tenant may hold at once (0: no quota).
    #[arg(long, default_value_t = 0)]
    max_subjects: u64,
}

impl PolicyArgs {
    fn message(&self) -> pb::TenantPolicy {
        pb::TenantPolicy {
            rotation_period_seconds: self.rotation_period.map_or(0, |d| d.as_secs()),
            retention_seconds: self.retention.map_or(0, |d| d.as_secs()),
            min_decrypt_version: self.min_decrypt_version,
            max_items_per_second: self.max_items_per_second,
            burst: self.burst,
            max_plaintext_bytes: self.max_plaintext_bytes,
            subject_ids: self.subject_ids.clone(),
            max_subjects: self.max_subjects,
        }
    }
}

pub async fn run(mut admin: AdminClient, command: TenantCommand) -> Result<(), CliError> {
    match command {
        TenantCommand::Create {
            id,
            root_key,
            region,
            policy,
        } => {
            let tenant = admin
                .create_tenant(pb::CreateTenantRequest {
                    tenant_id: id,
                    root_key,
                    region,
                    policy: Some(policy.message()),
                })
                .await?;
            print_tenant(&tenant.into_inner());
        }
        TenantCommand::Policy { id, policy } => {
            let tenant = admin
                .update_tenant_policy(pb::UpdateTenantPolicyRequest {
                    tenant_id: id,
                    policy: Some(policy.message()),
                })
                .await?;
            print_tenant(&tenant.into_inner());
        }
        TenantCommand::Show { id } => {
            let tenant = admin
                .get_tenant(pb::GetTenantRequest { tenant_id: id })
                .await?;
            print_tenant(&tenant.into_inner());
        }
        TenantCommand::Rotate { id } => {
            let tenant = admin
                .rotate_tenant_key(pb::RotateTenantKeyRequest { tenant_id: id })
                .await?;
            print_tenant(&tenant.into_inner());
        }
        TenantCommand::List { page_size } => {
            let mut page_token = String::new();
            loop {
                let page = admin
                    .list_tenants(pb::ListTenantsRequest {
                        page_size,
                        page_token,
                    })
                    .await?
                    .into_inner();
                for t in &page.tenants {
                    match t.state() {
                        pb::TenantState::Shredded => {
                            println!("{}\tshredded\t{}", t.tenant_id, time(t.shredded_at))
                        }
                        _ => println!("{}\tactive\tv{}", t.tenant_id, t.primary_version),
                    }
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        TenantCommand::Shred {
            id,
            confirm,
            receipt,
        } => {
            let r = admin
                .shred_tenant(pb::ShredTenantRequest {
                    tenant_id: id,
                    confirm,
                })
                .await?
                .into_inner();
            let at = time(r.shredded_at);
            if r.already_shredded {
                println!("tenant {} was already shredded at {at}", r.tenant_id);
            } else {
                println!(
                    "shredded tenant {} at {at}: destroyed {} key version(s) and {} subject key(s)",
                    r.tenant_id, r.destroyed_key_versions, r.destroyed_subject_keys
                );
            }
            if r.root_key_deletion_date.is_some() {
                println!(
                    "its dedicated root key {} is deleted by KMS at {}",
                    r.root_key_id,
                    time(r.root_key_deletion_date)
                );
            }
            save_receipt(&r.receipt, receipt)?;
        }
    }
    Ok(())
}

fn print_tenant(t: &pb::Tenant) {
    println!("tenant:   {}", t.tenant_id);
    let tier = match t.tier() {
        pb::TenantTier::Dedicated => "dedicated root key",
        pb::TenantTier::Customer => "customer root key",
        _ => "shared root key",
    };
    let region = if t.region.is_empty() {
        "default region"
    } else {
        &t.region
    };
    let root_key = if t.root_key_id.is_empty() {
        "-"
    } else {
        &t.root_key_id
    };
    println!("root key: {root_key} ({tier}, {region})");
    match t.state() {
        pb::TenantState::Shredded => {
            println!("state:    shredded at {}", time(t.shredded_at));
            println!("created:  {}", time(t.created_at));
            if t.root_key_deletion_date.is_some() {
                println!(
                    "root key deleted by KMS at {}",
                    time(t.root_key_deletion_date)
                );
            }
        }
        _ => {
            println!("state:    active");
            println!("created:  {}", time(t.created_at));
            println!("primary:  v{}", t.primary_version);
            for v in &t.versions {
                let role = if v.version == t.primary_version {
                    "primary"
                } else {
                    "decrypt only"
                };
                println!(
                    "  v{:<6} {:<13} created {}  root key {}",
                    v.version,
                    role,
                    time(v.created_at),
                    v.root_key_id
                );
            }
        }
    }
}
