//! Block store recovery on arbitrary file contents: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"CMBLKS01".to_vec();
    bytes.extend_from_slice(data);
    std::fs::write(dir.path().join("blocks.dat"), &bytes).unwrap();
    if let Ok((s, _)) = cybermesh::edges::store::BlockStore::open(dir.path(), Default::default()) {
        for h in 1..=s.height() {
            let _ = s.read(h);
        }
    }
});
