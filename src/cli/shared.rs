//! What the Admin commands share: the client, receipts written to files,
//! timestamps printed.

use std::path::PathBuf;

use keywarden::{api::pb, client};

use super::CliError;

pub type AdminClient = pb::admin_client::AdminClient<client::Authed>;

/// Writes a receipt to `file`, or prints it.
pub fn save_receipt(receipt: &str, file: Option<PathBuf>) -> Result<(), CliError> {
    match file {
        Some(path) => std::fs::write(&path, receipt).map_err(|e| {
            CliError::Output(format!(
                "the shred is done but its receipt could not be written to {}: {e}; the receipt:\n{receipt}",
                path.display()
            ))
        }),
        None => {
            print!("{receipt}");
            Ok(())
        }
    }
}

/// A timestamp as the sidecar's logs print one, or "-".
pub fn time(ts: Option<prost_types::Timestamp>) -> String {
    let Some(ts) = ts else { return "-".into() };
    let millis = ts.seconds.saturating_mul(1000) + i64::from(ts.nanos / 1_000_000);
    keywarden::time::UnixMillis(millis).to_string()
}
