fn main() -> std::process::ExitCode {
    llmflash::cli::main()
}
