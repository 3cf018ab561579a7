fn main() -> std::process::ExitCode {
    monodon::main()
}
