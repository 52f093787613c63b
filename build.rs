fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/cybermesh/v1/ai_events.proto",
        "proto/cybermesh/v1/control_events.proto",
        "proto/cybermesh/v1/validator.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    // protox compiles the .proto files in Rust: no system protoc needed.
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
