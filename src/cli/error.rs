//! How a client command fails: what the sidecar answered, or what went wrong
//! here. Every failure prints one line on stderr, `CODE_NAME: message`, with
//! the gRPC code's canonical name (for a local failure, the code a sidecar
//! would give the same fault), and exits 1.

use keywarden::api::status::code_name;
use tonic::{Code, Status};

#[derive(Debug)]
pub enum CliError {
    /// The sidecar answered a call with an error.
    Sidecar(Status),
    /// The sidecar could not be reached.
    Unreachable(String),
    /// A local input is unusable: a file that cannot be read, a token or
    /// ciphertext that is not valid text.
    Input(String),
    /// The answer could not be written out.
    Output(String),
    /// The root key rotation's stream ended without an update.
    RotationSilent,
    /// The root key rotation stopped before the end.
    RotationInterrupted,
}

impl CliError {
    /// The code printed before the message.
    fn code(&self) -> Code {
        match self {
            CliError::Sidecar(status) => status.code(),
            CliError::Unreachable(_) => Code::Unavailable,
            CliError::Input(_) => Code::InvalidArgument,
            CliError::Output(_) | CliError::RotationSilent => Code::Unknown,
            CliError::RotationInterrupted => Code::Aborted,
        }
    }

    fn message(&self) -> &str {
        match self {
            CliError::Sidecar(status) => status.message(),
            CliError::Unreachable(message)
            | CliError::Input(message)
            | CliError::Output(message) => message,
            CliError::RotationSilent => "the sidecar ended the rotation without a word",
            CliError::RotationInterrupted => {
                "the rotation stopped before the end; run it again to resume"
            }
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", code_name(self.code()), self.message())
    }
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Sidecar(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_the_code_name_and_the_message() {
        let cases = [
            (
                CliError::Sidecar(Status::not_found("tenant acme not found")),
                "NOT_FOUND: tenant acme not found",
            ),
            (
                CliError::Unreachable("cannot connect to 127.0.0.1:1".into()),
                "UNAVAILABLE: cannot connect to 127.0.0.1:1",
            ),
            (
                CliError::Input("cannot read standard input".into()),
                "INVALID_ARGUMENT: cannot read standard input",
            ),
            (
                CliError::Output("cannot write the plaintext".into()),
                "UNKNOWN: cannot write the plaintext",
            ),
            (
                CliError::RotationSilent,
                "UNKNOWN: the sidecar ended the rotation without a word",
            ),
            (
                CliError::RotationInterrupted,
                "ABORTED: the rotation stopped before the end; run it again to resume",
            ),
        ];
        for (error, printed) in cases {
            assert_eq!(error.to_string(), printed);
        }
    }
}
