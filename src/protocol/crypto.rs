//! Ed25519 signing, keys on disk, and the one accept rule for signatures.
//!
//! # Accept rule
//! A signature `(R, s)` by key `A` on message `M` is accepted iff
//! 1. `A` is a configured producer/validator key (checked once at config load:
//!    it must be the canonical encoding of a point of prime order ℓ: no
//!    small-order keys, no torsion component);
//! 2. `s` is canonical (`s < ℓ`);
//! 3. `R` decodes (non-canonical encodings of `R` are rejected as well: the
//!    y coordinate must be `< p`) and `R` is not of small order;
//! 4. the cofactored equation `[8][s]B = [8]R + [8][k]A` holds, with
//!    `k = SHA-512(R || A || M) mod ℓ` (ZIP-215).
//!
//! Checks 2–3 are per signature and syntactic; check 4 is the one equation
//! that batch verification also checks (with random coefficients), so a
//! signature is accepted alone iff it is accepted in any batch: the cofactored
//! equation is what makes that true for mixed-order `R` and `A`, where the
//! cofactorless equation used by most libraries gives batch/single
//! disagreements. Tests in this module cover the edge cases.

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use curve25519_dalek::Scalar;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::Signer;
use sha2::{Digest, Sha512};
use std::path::Path;

pub use ed25519_dalek::SigningKey;

/// A 32-byte Ed25519 public key.
pub type PublicKey = [u8; 32];
/// A 64-byte Ed25519 signature.
pub type Signature = [u8; 64];

/// Why a key or signature is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum CryptoError {
    #[error("public key is not a valid Ed25519 point encoding")]
    KeyNotAPoint,
    #[error("public key is not canonically encoded")]
    KeyNonCanonical,
    #[error("public key is a small-order point (weak key)")]
    KeySmallOrder,
    #[error("public key has a small-order (torsion) component")]
    KeyHasTorsion,
    #[error("signature scalar s is not canonical (s >= l)")]
    NonCanonicalS,
    #[error("signature R is not a valid, canonical point encoding")]
    BadR,
    #[error("signature R is a small-order point")]
    SmallOrderR,
    #[error("signature equation does not hold")]
    Invalid,
}

/// y-coordinate of an encoding is < p (the encoding is canonical up to the sign bit).
fn y_is_canonical(enc: &[u8; 32]) -> bool {
    // p = 2^255 - 19. Non-canonical y are exactly p..2^255-1, i.e. the
    // encodings whose low 255 bits are >= p.
    let mut y = *enc;
    y[31] &= 0x7f;
    // y >= p  <=>  y[31] == 0x7f, y[1..31] all 0xff, y[0] >= 0xed
    !(y[31] == 0x7f && y[1..31].iter().all(|&b| b == 0xff) && y[0] >= 0xed)
}

/// Checks a key against rule 1 of the accept rule (done once, at config load).
pub fn check_public_key(key: &PublicKey) -> Result<(), CryptoError> {
    if !y_is_canonical(key) {
        return Err(CryptoError::KeyNonCanonical);
    }
    let p = CompressedEdwardsY(*key).decompress().ok_or(CryptoError::KeyNotAPoint)?;
    // x = 0 with the sign bit set is another non-canonical encoding.
    if p.compress().0 != *key {
        return Err(CryptoError::KeyNonCanonical);
    }
    if p.is_small_order() {
        return Err(CryptoError::KeySmallOrder);
    }
    if !p.is_torsion_free() {
        return Err(CryptoError::KeyHasTorsion);
    }
    Ok(())
}

/// Per-signature syntactic checks (rules 2 and 3); cheap, no scalar multiplication.
pub fn precheck_signature(sig: &Signature) -> Result<(), CryptoError> {
    parse_signature(sig).map(|_| ())
}

/// Rules 2 and 3: the decoded `R` and the scalar `s`.
fn parse_signature(sig: &Signature) -> Result<(EdwardsPoint, Scalar), CryptoError> {
    let (s, r) = parse_encodings(sig)?;
    Ok((check_r(r.decompress())?, s))
}

/// `parse_signature` for many signatures: the `R` decodings (the costly
/// part, an exponentiation each) run four at a time where the CPU can
/// (`CompressedEdwardsY::decompress_batch`). Same verdicts, in order.
fn parse_signatures<'a>(sigs: impl Iterator<Item = &'a Signature>) -> Vec<Result<(EdwardsPoint, Scalar), CryptoError>> {
    let enc: Vec<Result<(Scalar, CompressedEdwardsY), CryptoError>> = sigs.map(parse_encodings).collect();
    let rs: Vec<CompressedEdwardsY> = enc.iter().filter_map(|e| e.as_ref().ok().map(|(_, r)| *r)).collect();
    let mut points = CompressedEdwardsY::decompress_batch(&rs).into_iter();
    enc.into_iter()
        .map(|e| {
            let (s, _) = e?;
            Ok((check_r(points.next().expect("one decoding per well-formed signature"))?, s))
        })
        .collect()
}

/// Rule 2 and the encoding half of rule 3: canonical `s`, canonical `y` of `R`.
fn parse_encodings(sig: &Signature) -> Result<(Scalar, CompressedEdwardsY), CryptoError> {
    let s_bytes: [u8; 32] = sig[32..].try_into().expect("64-byte signature");
    let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes)).ok_or(CryptoError::NonCanonicalS)?;
    let r: [u8; 32] = sig[..32].try_into().expect("64-byte signature");
    if !y_is_canonical(&r) {
        return Err(CryptoError::BadR);
    }
    Ok((s, CompressedEdwardsY(r)))
}

/// The point half of rule 3: `R` decodes and is not of small order.
fn check_r(decoded: Option<EdwardsPoint>) -> Result<EdwardsPoint, CryptoError> {
    let rp = decoded.ok_or(CryptoError::BadR)?;
    if rp.is_small_order() {
        return Err(CryptoError::SmallOrderR);
    }
    Ok(rp)
}

/// `k = SHA-512(R || A || M) mod ℓ`, over the encodings as sent.
fn challenge(sig: &Signature, key: &PublicKey, msg: &[u8]) -> Scalar {
    wide_scalar(Sha512::new().chain_update(&sig[..32]).chain_update(key).chain_update(msg))
}

/// A SHA-512 output reduced mod ℓ (curve25519-dalek 5's `from_hash` takes
/// the newer `digest` traits; this is the same reduction).
fn wide_scalar(h: Sha512) -> Scalar {
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

/// Decodes a key, through a per-thread cache: keys are the configured
/// producers and validators, decoded again and again otherwise.
fn key_point(key: &PublicKey) -> Result<EdwardsPoint, CryptoError> {
    /// Bound on the cache (cleared when full: more keys than this are not
    /// expected, and a clear only costs decodes).
    const MAX_CACHED_KEYS: usize = 4096;
    thread_local! {
        static KEYS: std::cell::RefCell<std::collections::HashMap<PublicKey, EdwardsPoint>> = Default::default();
    }
    KEYS.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(p) = c.get(key) {
            return Ok(*p);
        }
        let p = CompressedEdwardsY(*key).decompress().ok_or(CryptoError::KeyNotAPoint)?;
        if c.len() >= MAX_CACHED_KEYS {
            c.clear();
        }
        c.insert(*key, p);
        Ok(p)
    })
}

/// The curve arithmetic backend curve25519-dalek uses on this CPU (it picks
/// at run time; this mirrors its choice): `avx512ifma`, `avx2` or `serial`.
/// Logged at startup and printed by loadgen, so figures from different
/// machines can be told apart.
pub fn curve_backend() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(curve25519_dalek_backend = "serial") || cfg!(curve25519_dalek_backend = "fiat") {
            return "serial";
        }
        if cfg!(curve25519_dalek_backend = "avx512")
            && std::arch::is_x86_feature_detected!("avx512ifma")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return "avx512ifma";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "serial"
}

/// Verifies one signature under the accept rule. `key` must have passed
/// [`check_public_key`].
pub fn verify_one(key: &PublicKey, msg: &[u8], sig: &Signature) -> Result<(), CryptoError> {
    let (r, s) = parse_signature(sig)?;
    let a = key_point(key)?;
    let k = challenge(sig, key, msg);
    // [8]([s]B - [k]A - R) = 0
    let sb_minus_ka = EdwardsPoint::vartime_double_scalar_mul_basepoint(&k, &-a, &s);
    if (sb_minus_ka - r).mul_by_cofactor().is_identity() {
        Ok(())
    } else {
        Err(CryptoError::Invalid)
    }
}

/// One item of a batch: key, message, signature.
pub struct BatchItem<'a> {
    pub key: &'a PublicKey,
    pub msg: &'a [u8],
    pub sig: &'a Signature,
}

/// A signature that passed rules 2–3, ready for the equation.
struct Parsed {
    r: EdwardsPoint,
    s: Scalar,
    k: Scalar,
    /// Index of its key in the batch's distinct keys.
    key: usize,
}

/// Verifies a batch under the accept rule and returns one result per item, in
/// order. The fast path is one multiscalar check for the whole batch; if it
/// fails, the batch is bisected so that exactly the bad signatures are
/// identified (each verdict equals [`verify_one`]'s).
///
/// The check, with independent random 128-bit `z_i`:
/// `[8]( Σ z_i·R_i + Σ_A (Σ_{i signed by A} z_i·k_i)·A − (Σ z_i·s_i)·B ) = 0`
/// — one multiscalar multiplication of `n + keys + 1` points (curve25519-dalek's
/// vectorised backend where the CPU has one), every `R` and key decoded once.
pub fn verify_batch(items: &[BatchItem<'_>]) -> Vec<Result<(), CryptoError>> {
    let mut out: Vec<Result<(), CryptoError>> = Vec::with_capacity(items.len());
    // Distinct keys of the batch: each gets one coefficient.
    let mut key_index: std::collections::HashMap<&PublicKey, usize> = Default::default();
    let mut key_points: Vec<EdwardsPoint> = Vec::new();
    let mut parsed: Vec<Option<Parsed>> = Vec::with_capacity(items.len());
    for (it, rs) in items.iter().zip(parse_signatures(items.iter().map(|it| it.sig))) {
        let p = rs.and_then(|(r, s)| {
            let key = match key_index.get(it.key) {
                Some(&j) => j,
                None => {
                    key_points.push(key_point(it.key)?);
                    key_index.insert(it.key, key_points.len() - 1);
                    key_points.len() - 1
                }
            };
            Ok(Parsed { r, s, k: challenge(it.sig, it.key, it.msg), key })
        });
        out.push(p.as_ref().map(|_| ()).map_err(|e| *e));
        parsed.push(p.ok());
    }
    let ok: Vec<usize> = (0..items.len()).filter(|&i| parsed[i].is_some()).collect();
    let mut rng = rand::thread_rng();
    verify_subset(&parsed, &key_points, &ok, &mut out, &mut rng);
    out
}

fn verify_subset(
    parsed: &[Option<Parsed>],
    keys: &[EdwardsPoint],
    idx: &[usize],
    out: &mut [Result<(), CryptoError>],
    rng: &mut impl rand::Rng,
) {
    if idx.is_empty() {
        return;
    }
    let mut b_coeff = Scalar::ZERO;
    let mut key_coeff = vec![Scalar::ZERO; keys.len()];
    let mut scalars = Vec::with_capacity(idx.len() + keys.len() + 1);
    let mut points = Vec::with_capacity(idx.len() + keys.len() + 1);
    for &i in idx {
        let p = parsed[i].as_ref().expect("only parsed items are checked");
        // Alone, the equation itself (no coefficient needed).
        let z = if idx.len() == 1 { Scalar::ONE } else { Scalar::from(rng.gen::<u128>()) };
        b_coeff -= z * p.s;
        key_coeff[p.key] += z * p.k;
        scalars.push(z);
        points.push(p.r);
    }
    for (c, a) in key_coeff.into_iter().zip(keys) {
        if c != Scalar::ZERO {
            scalars.push(c);
            points.push(*a);
        }
    }
    scalars.push(b_coeff);
    points.push(ED25519_BASEPOINT_POINT);
    if EdwardsPoint::vartime_multiscalar_mul(scalars, points).mul_by_cofactor().is_identity() {
        return;
    }
    if idx.len() == 1 {
        out[idx[0]] = Err(CryptoError::Invalid);
        return;
    }
    // At least one is bad: bisect. Cost is O(bad · log n) batch checks.
    let (a, b) = idx.split_at(idx.len() / 2);
    verify_subset(parsed, keys, a, out, rng);
    verify_subset(parsed, keys, b, out, rng);
}

/// Signs `msg` with `key`.
pub fn sign(key: &SigningKey, msg: &[u8]) -> Signature {
    key.sign(msg).to_bytes()
}

/// The public key of `key`.
pub fn public_key(key: &SigningKey) -> PublicKey {
    key.verifying_key().to_bytes()
}

/// A fresh random signing key.
pub fn generate_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// Errors reading or writing key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: already exists; refusing to overwrite a key (remove it first if you mean to)")]
    Exists { path: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not an Ed25519 PKCS#8 PEM private key ({detail})")]
    Format { path: String, detail: String },
    #[error("{path}: key file is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
}

/// Writes `key` as PKCS#8 PEM (what `openssl genpkey -algorithm ED25519`
/// writes), created with mode 0600; never overwrites.
pub fn write_key_file(path: &Path, key: &SigningKey) -> Result<(), KeyFileError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = path.display().to_string();
    // PKCS#8 v1 (no embedded public key): what OpenSSL writes and reads.
    let pem = ed25519_dalek::pkcs8::KeypairBytes { secret_key: key.to_bytes(), public_key: None }
        .to_pkcs8_pem(Default::default())
        .map_err(|e| KeyFileError::Format { path: p.clone(), detail: e.to_string() })?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| match e
        .kind()
    {
        std::io::ErrorKind::AlreadyExists => KeyFileError::Exists { path: p.clone() },
        _ => KeyFileError::Io { path: p.clone(), source: e },
    })?;
    f.write_all(pem.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| KeyFileError::Io { path: p, source: e })
}

/// Reads a PKCS#8 PEM Ed25519 key. With `require_private_mode`, a file that
/// group or others can read is refused (production checklist).
pub fn read_key_file(path: &Path, require_private_mode: bool) -> Result<SigningKey, KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| KeyFileError::Io { path: p.clone(), source: e })?;
    let mode = meta.permissions().mode() & 0o777;
    if require_private_mode && mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path: p, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|e| KeyFileError::Io { path: p.clone(), source: e })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyFileError::Format { path: p, detail: e.to_string() })
}

/// Parses a 64-hex-char public key.
pub fn parse_public_key_hex(s: &str) -> Result<PublicKey, String> {
    let bytes = hex::decode(s.trim()).map_err(|e| format!("not hex: {e}"))?;
    let key: PublicKey =
        bytes.try_into().map_err(|b: Vec<u8>| format!("expected 32 bytes (64 hex chars), got {} bytes", b.len()))?;
    check_public_key(&key).map_err(|e| e.to_string())?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
    use curve25519_dalek::Scalar;
    use sha2::{Digest, Sha512};

    fn k(sk: &SigningKey) -> PublicKey {
        public_key(sk)
    }

    fn batch_verdicts(items: &[(PublicKey, Vec<u8>, Signature)]) -> Vec<Result<(), CryptoError>> {
        let b: Vec<BatchItem> = items.iter().map(|(k, m, s)| BatchItem { key: k, msg: m, sig: s }).collect();
        verify_batch(&b)
    }

    /// Hand-made signature with chosen R and A components (for mixed-order cases).
    fn forge(
        a_scalar: Scalar,
        a_torsion: usize,
        r_scalar: Scalar,
        r_torsion: usize,
        msg: &[u8],
    ) -> (PublicKey, Signature) {
        let a = ED25519_BASEPOINT_POINT * a_scalar + EIGHT_TORSION[a_torsion];
        let r = ED25519_BASEPOINT_POINT * r_scalar + EIGHT_TORSION[r_torsion];
        let (ae, re) = (a.compress().0, r.compress().0);
        let h = Sha512::new().chain_update(re).chain_update(ae).chain_update(msg);
        let kk = wide_scalar(h);
        let s = r_scalar + kk * a_scalar;
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&re);
        sig[32..].copy_from_slice(s.as_bytes());
        (ae, sig)
    }

    #[test]
    fn honest_signatures_pass_alone_and_in_batch() {
        let keys: Vec<SigningKey> = (0..5).map(|_| generate_key()).collect();
        let items: Vec<_> = (0..40)
            .map(|i| {
                let sk = &keys[i % 5];
                let m = format!("msg {i}").into_bytes();
                let s = sign(sk, &m);
                (k(sk), m, s)
            })
            .collect();
        for (key, m, s) in &items {
            assert_eq!(verify_one(key, m, s), Ok(()));
        }
        assert!(batch_verdicts(&items).iter().all(|r| r.is_ok()));
    }

    #[test]
    fn one_bad_signature_in_a_batch_is_identified() {
        let sk = generate_key();
        let mut items: Vec<_> = (0..64)
            .map(|i| {
                let m = vec![i as u8; 10];
                (k(&sk), m.clone(), sign(&sk, &m))
            })
            .collect();
        items[37].1[0] ^= 1; // message altered after signing
        let v = batch_verdicts(&items);
        for (i, r) in v.iter().enumerate() {
            if i == 37 {
                assert_eq!(*r, Err(CryptoError::Invalid));
            } else {
                assert_eq!(*r, Ok(()), "item {i}");
            }
        }
    }

    #[test]
    fn non_canonical_s_is_rejected_alone_and_in_batch() {
        let sk = generate_key();
        let m = b"hello".to_vec();
        let mut sig = sign(&sk, &m);
        // s + l has the same value mod l but is non-canonical.
        // l = 2^252 + 27742317777372353535851937790883648493, little-endian.
        let l: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let s = Scalar::from_canonical_bytes(sig[32..].try_into().unwrap()).unwrap();
        let mut wide = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let v = s.as_bytes()[i] as u16 + l[i] as u16 + carry;
            wide[i] = v as u8;
            carry = v >> 8;
        }
        // s < 2^253, so s + l < 2^254 always fits in 32 bytes.
        assert_eq!(carry, 0);
        {
            sig[32..].copy_from_slice(&wide);
            assert_eq!(verify_one(&k(&sk), &m, &sig), Err(CryptoError::NonCanonicalS));
            let v = batch_verdicts(&[(k(&sk), m.clone(), sig)]);
            assert_eq!(v[0], Err(CryptoError::NonCanonicalS));
        }
        let mut sig2 = sign(&sk, &m);
        sig2[63] |= 0xf0;
        assert_eq!(verify_one(&k(&sk), &m, &sig2), Err(CryptoError::NonCanonicalS));
    }

    #[test]
    fn small_order_and_non_canonical_keys_are_refused() {
        for t in EIGHT_TORSION.iter() {
            assert_eq!(check_public_key(&t.compress().0), Err(CryptoError::KeySmallOrder));
        }
        // Identity encoded with y = p + 1 (non-canonical).
        let mut enc = [0xffu8; 32];
        enc[0] = 0xee;
        enc[31] = 0x7f;
        assert_eq!(check_public_key(&enc), Err(CryptoError::KeyNonCanonical));
        // x = 0 with the sign bit set: y = 1, sign 1.
        let mut enc2 = [0u8; 32];
        enc2[0] = 1;
        enc2[31] = 0x80;
        assert!(check_public_key(&enc2).is_err());
        assert_eq!(check_public_key(&k(&generate_key())), Ok(()));
    }

    #[test]
    fn small_order_and_non_canonical_r_are_rejected() {
        let sk = generate_key();
        let m = b"m".to_vec();
        for t in EIGHT_TORSION.iter() {
            let mut sig = sign(&sk, &m);
            sig[..32].copy_from_slice(&t.compress().0);
            assert_eq!(verify_one(&k(&sk), &m, &sig), Err(CryptoError::SmallOrderR));
            assert_eq!(batch_verdicts(&[(k(&sk), m.clone(), sig)])[0], Err(CryptoError::SmallOrderR));
        }
        let mut sig = sign(&sk, &m);
        let mut enc = [0xffu8; 32];
        enc[0] = 0xee;
        enc[31] = 0x7f;
        sig[..32].copy_from_slice(&enc);
        assert_eq!(verify_one(&k(&sk), &m, &sig), Err(CryptoError::BadR));
    }

    #[test]
    fn mixed_order_r_and_key_agree_alone_and_in_batch() {
        // With torsion in R or A, the cofactorless equation fails for most
        // signatures but the cofactored one holds: our rule must say the same
        // thing alone and in every batch, whichever way it goes.
        let msg = b"mixed".to_vec();
        let honest = generate_key();
        let mut items = vec![];
        for (at, rt) in [(0, 1), (1, 0), (2, 3), (4, 4), (0, 0)] {
            let (key, sig) =
                forge(Scalar::from(1234567u64 + at as u64), at, Scalar::from(7654321u64 + rt as u64), rt, &msg);
            items.push((key, msg.clone(), sig));
        }
        for i in 0..20 {
            let m = vec![i; 3];
            items.push((k(&honest), m.clone(), sign(&honest, &m)));
        }
        let alone: Vec<_> = items.iter().map(|(k, m, s)| verify_one(k, m, s)).collect();
        // Cofactored equation: all of these hold.
        assert!(alone.iter().all(|r| r.is_ok()), "{alone:?}");
        assert_eq!(batch_verdicts(&items), alone);
        for chunk in [1usize, 2, 3, 7] {
            let got: Vec<_> = items.chunks(chunk).flat_map(batch_verdicts).collect();
            assert_eq!(got, alone, "chunk {chunk}");
        }
        // A torsioned key is refused by the key policy, not by the equation.
        assert_eq!(check_public_key(&items[1].0), Err(CryptoError::KeyHasTorsion));
        assert_eq!(check_public_key(&items[0].0), Ok(()));
    }

    /// `.cargo/config.toml` compiles the IFMA backend in: on a CPU that has
    /// IFMA it is the one in use, elsewhere AVX2 where present. (Fails if
    /// the config stops applying, e.g. a RUSTFLAGS variable without its --cfg.)
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_fastest_curve_backend_the_cpu_has_is_in_use() {
        let want =
            if std::arch::is_x86_feature_detected!("avx512ifma") && std::arch::is_x86_feature_detected!("avx512vl") {
                "avx512ifma"
            } else if std::arch::is_x86_feature_detected!("avx2") {
                "avx2"
            } else {
                "serial"
            };
        assert_eq!(curve_backend(), want, "see .cargo/config.toml");
    }

    /// The vendored batch decoder (`vendor/curve25519-dalek`) against the
    /// one-at-a-time decoder, on every lane position and remainder length:
    /// valid points, random bytes (about half are not points), and the edge
    /// cases (torsion points with both sign bits, y = 0, ±1, non-canonical y).
    #[test]
    fn batched_point_decoding_equals_one_at_a_time() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut inputs: Vec<[u8; 32]> = Vec::new();
        for t in EIGHT_TORSION.iter() {
            let e = t.compress().0;
            inputs.push(e);
            let mut flipped = e;
            flipped[31] ^= 0x80;
            inputs.push(flipped);
        }
        let p_minus_1: [u8; 32] = {
            let mut b = [0xff; 32];
            b[0] = 0xec;
            b[31] = 0x7f;
            b
        };
        let mut p_plus_1 = p_minus_1;
        p_plus_1[0] = 0xee;
        let one = {
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        };
        for e in [[0u8; 32], one, p_minus_1, p_plus_1, [0xff; 32]] {
            inputs.push(e);
            let mut flipped = e;
            flipped[31] ^= 0x80;
            inputs.push(flipped);
        }
        for i in 0..300u64 {
            inputs.push((ED25519_BASEPOINT_POINT * Scalar::from(i * 1_000_003 + 1)).compress().0);
            inputs.push(rng.gen());
        }
        // Shuffled so that every kind lands in every lane.
        for round in 0..4 {
            for i in (1..inputs.len()).rev() {
                inputs.swap(i, rng.gen_range(0..=i));
            }
            for len in [inputs.len(), 0, 1, 3, 4, 5, 7, 8, 9].into_iter().skip(if round == 0 { 0 } else { 1 }) {
                let encs: Vec<CompressedEdwardsY> = inputs[..len].iter().map(|e| CompressedEdwardsY(*e)).collect();
                let batch = CompressedEdwardsY::decompress_batch(&encs);
                assert_eq!(batch.len(), len);
                for (e, got) in encs.iter().zip(&batch) {
                    let want = e.decompress();
                    assert_eq!(got.is_some(), want.is_some(), "{:?}", e.0);
                    if let (Some(g), Some(w)) = (got, want) {
                        assert_eq!(*g, w);
                        assert_eq!(g.compress(), w.compress());
                    }
                }
                if round == 0 && len == inputs.len() {
                    let valid = batch.iter().filter(|p| p.is_some()).count();
                    assert!(valid > 300 && valid < len, "a mix of points and non-points: {valid} of {len}");
                }
            }
        }
    }

    /// The accept rule is ZIP-215's cofactored equation plus rules 2–3:
    /// our verdict, alone and in batches of every shape, equals the
    /// reference implementation's (ed25519-consensus) where rules 2–3 pass,
    /// over honest, altered, re-keyed and mixed-order signatures.
    #[test]
    fn verdicts_equal_the_reference_implementation_alone_and_in_batches() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let keys: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut rng)).collect();
        let mut items: Vec<(PublicKey, Vec<u8>, Signature)> = vec![];
        for i in 0..300u32 {
            let m = i.to_le_bytes().to_vec();
            let item = match rng.gen_range(0..6) {
                0 => {
                    let (a, at, r, rt) = (rng.gen::<u64>(), rng.gen_range(0..8), rng.gen::<u64>(), rng.gen_range(0..8));
                    let (key, sig) = forge(Scalar::from(a), at, Scalar::from(r), rt, &m);
                    (key, m, sig)
                }
                1 => {
                    let sk = &keys[rng.gen_range(0..3)];
                    let mut sig = sign(sk, &m);
                    sig[rng.gen_range(0..32)] ^= 1 << rng.gen_range(0..8); // R altered
                    (k(sk), m, sig)
                }
                2 => {
                    let sk = &keys[0];
                    (k(&keys[1]), m.clone(), sign(sk, &m)) // wrong key
                }
                _ => {
                    let sk = &keys[rng.gen_range(0..3)];
                    (k(sk), m.clone(), sign(sk, &m))
                }
            };
            items.push(item);
        }
        let alone: Vec<_> = items.iter().map(|(k, m, s)| verify_one(k, m, s)).collect();
        for ((key, m, s), ours) in items.iter().zip(&alone) {
            let reference = ed25519_consensus::VerificationKey::try_from(*key)
                .and_then(|vk| vk.verify(&ed25519_consensus::Signature::from(*s), m));
            match precheck_signature(s) {
                Ok(()) => assert_eq!(ours.is_ok(), reference.is_ok(), "{ours:?} vs {reference:?}"),
                Err(e) => assert_eq!(*ours, Err(e)),
            }
        }
        assert!(alone.iter().filter(|r| r.is_ok()).count() > 100 && alone.iter().any(|r| r.is_err()));
        for chunk in [1usize, 2, 5, 64, 300] {
            let got: Vec<_> = items.chunks(chunk).flat_map(batch_verdicts).collect();
            assert_eq!(got, alone, "chunk {chunk}");
        }
    }

    #[test]
    fn key_file_round_trip_mode_and_no_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let sk = generate_key();
        write_key_file(&path, &sk).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let back = read_key_file(&path, true).unwrap();
        assert_eq!(back.to_bytes(), sk.to_bytes());
        assert!(matches!(write_key_file(&path, &generate_key()), Err(KeyFileError::Exists { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read_key_file(&path, true), Err(KeyFileError::Permissions { .. })));
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
    }
}
