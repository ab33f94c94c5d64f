//! The `llmflash` command line: thin subcommands that parse, call the library and print.

use std::process::ExitCode;

pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
