//! POSIX tar (pax) encoding and decoding, just what the agent's streams need: regular files,
//! directories, symlinks, hard links, devices and FIFOs, with owners, modes, nanosecond
//! mtimes, extended attributes and names that are not UTF-8 (pax `hdrcharset=BINARY`).
//! Written by hand because the stream must be produced incrementally on the reader thread and
//! read back under our own path checks.

use std::io::{self, Read, Write};

pub const BLOCK: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File { size: u64 },
    Dir,
    Symlink { target: Vec<u8> },
    HardLink { target: Vec<u8> },
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
}

/// One entry's metadata. `path` is relative to the volume root, without a leading `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    pub fn size(&self) -> u64 {
        match self.kind {
            Kind::File { size } => size,
            _ => 0,
        }
    }
}

fn octal(field: &mut [u8], value: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    if s.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "<len> <key>=<value>\n", where <len> counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = len.to_string().len() + body;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Writes a tar stream.
#[derive(Debug)]
pub struct TarWriter<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn header(
        &mut self,
        e: &Entry,
        name: &[u8],
        typeflag: u8,
        size: u64,
        link: &[u8],
    ) -> io::Result<()> {
        let mut h = [0u8; BLOCK];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(e.mode & 0o7777));
        octal(&mut h[108..116], e.uid.min(0o7777777));
        octal(&mut h[116..124], e.gid.min(0o7777777));
        if !octal(&mut h[124..136], size) {
            return Err(io::Error::other("entry too large for a tar header"));
        }
        octal(&mut h[136..148], e.mtime_secs.max(0) as u64);
        h[156] = typeflag;
        let l = link.len().min(100);
        h[157..157 + l].copy_from_slice(&link[..l]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if let Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } = e.kind {
            octal(&mut h[329..337], u64::from(major));
            octal(&mut h[337..345], u64::from(minor));
        }
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        octal(&mut h[148..155], u64::from(sum));
        h[155] = b' ';
        self.write(&h)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.write(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// Writes an entry's header (and a pax header before it when ustar cannot hold it). For
    /// a file, exactly `size` bytes of data must follow through [`TarWriter::data`], then
    /// [`TarWriter::finish_entry`].
    pub fn append_header(&mut self, e: &Entry) -> io::Result<()> {
        let (typeflag, link): (u8, &[u8]) = match &e.kind {
            Kind::File { .. } => (b'0', b""),
            Kind::Dir => (b'5', b""),
            Kind::Symlink { target } => (b'2', target),
            Kind::HardLink { target } => (b'1', target),
            Kind::CharDevice { .. } => (b'3', b""),
            Kind::BlockDevice { .. } => (b'4', b""),
            Kind::Fifo => (b'6', b""),
        };
        let mut name = e.path.clone();
        if e.kind == Kind::Dir && !name.ends_with(b"/") {
            name.push(b'/');
        }
        let mut pax = Vec::new();
        // Short names go into the ustar header as raw bytes, which every tar reads; only long
        // ones need pax records, and only long non-UTF-8 ones need `hdrcharset=BINARY`.
        let long_name = name.len() > 100;
        let long_link = link.len() > 100;
        let binary = (long_name && std::str::from_utf8(&name).is_err())
            || (long_link && std::str::from_utf8(link).is_err());
        if binary {
            pax_record(&mut pax, b"hdrcharset", b"BINARY");
        }
        if long_name {
            pax_record(&mut pax, b"path", &name);
        }
        if long_link {
            pax_record(&mut pax, b"linkpath", link);
        }
        if e.size() > 0o77777777777 {
            pax_record(&mut pax, b"size", e.size().to_string().as_bytes());
        }
        if e.uid > 0o7777777 {
            pax_record(&mut pax, b"uid", e.uid.to_string().as_bytes());
        }
        if e.gid > 0o7777777 {
            pax_record(&mut pax, b"gid", e.gid.to_string().as_bytes());
        }
        if e.mtime_nanos != 0 || e.mtime_secs < 0 {
            let t = format!("{}.{:09}", e.mtime_secs, e.mtime_nanos);
            pax_record(&mut pax, b"mtime", t.as_bytes());
        }
        for (k, v) in &e.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        if !pax.is_empty() {
            let pax_entry = Entry {
                path: b"PaxHeader".to_vec(),
                kind: Kind::File {
                    size: pax.len() as u64,
                },
                xattrs: vec![],
                ..e.clone()
            };
            self.header(&pax_entry, b"PaxHeader", b'x', pax.len() as u64, b"")?;
            self.write(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        let size = if typeflag == b'0' {
            e.size().min(0o77777777777)
        } else {
            0
        };
        self.header(e, &name, typeflag, size, link)
    }

    pub fn data(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.write(chunk)
    }

    /// Pads the data of an entry of `size` bytes to the block boundary.
    pub fn finish_entry(&mut self, size: u64) -> io::Result<()> {
        self.pad(size)
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write(&[0u8; BLOCK * 2])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn parse_octal(field: &[u8]) -> io::Result<u64> {
    // Base-256 (GNU) for values that do not fit in octal.
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v
                .checked_mul(256)
                .ok_or_else(|| bad("numeric field overflows"))?
                + u64::from(*b);
        }
        return Ok(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|b| *b != 0)
        .filter(|b| *b != b' ')
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(&s).map_err(|_| bad("numeric field is not text"))?;
    u64::from_str_radix(text, 8).map_err(|_| bad("numeric field is not octal"))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("invalid tar stream: {msg}"),
    )
}

fn cstr(field: &[u8]) -> Vec<u8> {
    field.iter().copied().take_while(|b| *b != 0).collect()
}

/// Reads a tar stream entry by entry.
#[derive(Debug)]
pub struct TarReader<R: Read> {
    input: R,
    /// Data bytes of the current entry not yet consumed, and its padding.
    remaining: u64,
    padding: u64,
}

impl<R: Read> TarReader<R> {
    pub fn new(input: R) -> Self {
        TarReader {
            input,
            remaining: 0,
            padding: 0,
        }
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.input.read_exact(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn read_pax(&mut self, size: u64) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if size > 16 << 20 {
            return Err(bad("pax header larger than 16 MiB"));
        }
        let mut data = vec![0u8; size as usize];
        self.input.read_exact(&mut data)?;
        self.skip((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64)?;
        let mut records = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let space = rest
                .iter()
                .position(|b| *b == b' ')
                .ok_or_else(|| bad("pax record without length"))?;
            let len: usize = std::str::from_utf8(&rest[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("pax record length"))?;
            if len > rest.len() || len < space + 2 {
                return Err(bad("pax record length out of range"));
            }
            let record = &rest[space + 1..len - 1];
            let eq = record
                .iter()
                .position(|b| *b == b'=')
                .ok_or_else(|| bad("pax record without '='"))?;
            records.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
            rest = &rest[len..];
        }
        Ok(records)
    }

    /// The next entry, or `None` at the end of the archive. The previous entry's unread data
    /// is skipped.
    pub fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        self.skip(self.remaining + self.padding)?;
        self.remaining = 0;
        self.padding = 0;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        loop {
            let mut h = [0u8; BLOCK];
            match self.input.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
            if h.iter().all(|b| *b == 0) {
                return Ok(None);
            }
            let stored = parse_octal(&h[148..156])?;
            let mut sum_block = h;
            sum_block[148..156].copy_from_slice(b"        ");
            let sum: u64 = sum_block.iter().map(|b| u64::from(*b)).sum();
            if sum != stored {
                return Err(bad("header checksum mismatch"));
            }
            let typeflag = h[156];
            let mut size = parse_octal(&h[124..136])?;
            match typeflag {
                b'x' => {
                    pax.extend(self.read_pax(size)?);
                    continue;
                }
                b'g' => {
                    self.read_pax(size)?;
                    continue;
                }
                b'L' => {
                    let mut name = self.read_pax_raw(size)?;
                    while name.last() == Some(&0) {
                        name.pop();
                    }
                    long_name = Some(name);
                    continue;
                }
                _ => {}
            }
            let mut path = {
                let name = cstr(&h[0..100]);
                let prefix = cstr(&h[345..500]);
                if &h[257..262] == b"ustar" && !prefix.is_empty() {
                    [prefix, b"/".to_vec(), name].concat()
                } else {
                    name
                }
            };
            let mut link = cstr(&h[157..257]);
            let mut uid = parse_octal(&h[108..116])?;
            let mut gid = parse_octal(&h[116..124])?;
            let mut mtime_secs = parse_octal(&h[136..148])? as i64;
            let mut mtime_nanos = 0u32;
            let mut xattrs = Vec::new();
            if let Some(n) = long_name.take() {
                path = n;
            }
            for (k, v) in pax.drain(..) {
                match k.as_slice() {
                    b"path" => path = v,
                    b"linkpath" => link = v,
                    b"size" => size = parse_dec(&v)?,
                    b"uid" => uid = parse_dec(&v)?,
                    b"gid" => gid = parse_dec(&v)?,
                    b"mtime" => {
                        let text = String::from_utf8_lossy(&v).into_owned();
                        let (s, frac) = text.split_once('.').unwrap_or((&text, ""));
                        mtime_secs = s.parse().map_err(|_| bad("pax mtime"))?;
                        let frac = format!("{frac:0<9}");
                        mtime_nanos = frac[..9].parse().map_err(|_| bad("pax mtime"))?;
                    }
                    k if k.starts_with(b"SCHILY.xattr.") => {
                        xattrs.push((k[b"SCHILY.xattr.".len()..].to_vec(), v));
                    }
                    _ => {}
                }
            }
            while path.len() > 1 && path.ends_with(b"/") {
                path.pop();
            }
            let major = parse_octal(&h[329..337]).unwrap_or(0) as u32;
            let minor = parse_octal(&h[337..345]).unwrap_or(0) as u32;
            let kind = match typeflag {
                b'0' | 0 | b'7' => Kind::File { size },
                b'5' => Kind::Dir,
                b'2' => Kind::Symlink { target: link },
                b'1' => Kind::HardLink { target: link },
                b'3' => Kind::CharDevice { major, minor },
                b'4' => Kind::BlockDevice { major, minor },
                b'6' => Kind::Fifo,
                other => return Err(bad(&format!("unsupported entry type {:?}", other as char))),
            };
            let data = if matches!(kind, Kind::File { .. }) {
                size
            } else {
                0
            };
            self.remaining = data;
            self.padding = (BLOCK as u64 - data % BLOCK as u64) % BLOCK as u64;
            return Ok(Some(Entry {
                path,
                kind,
                mode: parse_octal(&h[100..108])? as u32,
                uid,
                gid,
                mtime_secs,
                mtime_nanos,
                xattrs,
            }));
        }
    }

    fn read_pax_raw(&mut self, size: u64) -> io::Result<Vec<u8>> {
        if size > 1 << 20 {
            return Err(bad("long name larger than 1 MiB"));
        }
        let mut data = vec![0u8; size as usize];
        self.input.read_exact(&mut data)?;
        self.skip((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64)?;
        Ok(data)
    }

    /// Reads and discards the rest of the input, to its end. A writer feeding the archive
    /// through a pipe (`restic dump`) fails with a broken pipe if the reader leaves before
    /// it has written everything, such as the second end-of-archive block.
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(&mut self.input, &mut io::sink())
    }

    /// Reads the current entry's data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let k = (buf.len() as u64).min(self.remaining) as usize;
        let n = self.input.read(&mut buf[..k])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tar data cut short",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn parse_dec(v: &[u8]) -> io::Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("pax number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &[u8], kind: Kind) -> Entry {
        Entry {
            path: path.to_vec(),
            kind,
            mode: 0o640,
            uid: 1000,
            gid: 3_000_000,
            mtime_secs: 1_700_000_000,
            mtime_nanos: 123_456_789,
            xattrs: vec![(b"user.note".to_vec(), b"hi".to_vec())],
        }
    }

    #[test]
    fn entries_round_trip_including_long_and_binary_names() -> io::Result<()> {
        let long = [b"d/".as_slice(), &[b'x'; 150]].concat();
        let binary = b"caf\xe9-\xff.txt".to_vec();
        let entries = vec![
            entry(b"d", Kind::Dir),
            entry(&long, Kind::File { size: 5 }),
            entry(&binary, Kind::File { size: 0 }),
            entry(
                b"d/link",
                Kind::Symlink {
                    target: long.clone(),
                },
            ),
            entry(
                b"d/hard",
                Kind::HardLink {
                    target: long.clone(),
                },
            ),
            entry(b"fifo", Kind::Fifo),
        ];
        let mut w = TarWriter::new(Vec::new());
        for e in &entries {
            w.append_header(e)?;
            if e.size() > 0 {
                w.data(b"hello")?;
                w.finish_entry(e.size())?;
            }
        }
        let bytes = w.finish()?;
        assert_eq!(bytes.len() % BLOCK, 0);
        let mut r = TarReader::new(&bytes[..]);
        let mut back = Vec::new();
        while let Some(e) = r.next_entry()? {
            let mut data = vec![0u8; 16];
            let n = r.read_data(&mut data)?;
            if e.size() > 0 {
                assert_eq!(&data[..n], b"hello");
            }
            back.push(e);
        }
        assert_eq!(back, entries);
        Ok(())
    }

    #[test]
    fn gnu_tar_reads_our_stream() -> io::Result<()> {
        // The system's tar must accept what we write: it is the reference reader.
        let dir = tempfile::tempdir()?;
        let mut w = TarWriter::new(Vec::new());
        w.append_header(&entry(b"a.txt", Kind::File { size: 5 }))?;
        w.data(b"hello")?;
        w.finish_entry(5)?;
        let long = [&[b'y'; 120][..], b".txt"].concat();
        w.append_header(&entry(&long, Kind::File { size: 0 }))?;
        let tar = w.finish()?;
        let status = std::process::Command::new("tar")
            .args(["-x", "-C"])
            .arg(dir.path())
            .stdin({
                let p = dir.path().join("in.tar");
                std::fs::write(&p, &tar)?;
                std::fs::File::open(p)?
            })
            .status()?;
        assert!(status.success());
        assert_eq!(std::fs::read(dir.path().join("a.txt"))?, b"hello");
        assert!(
            dir.path()
                .join(String::from_utf8_lossy(&long).as_ref())
                .exists()
        );
        Ok(())
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let mut w = TarWriter::new(Vec::new());
        w.append_header(&entry(b"a", Kind::Dir)).ok();
        let mut bytes = w.finish().unwrap_or_default();
        bytes[10] ^= 1;
        let err = TarReader::new(&bytes[..]).next_entry();
        assert!(err.is_err());
    }
}
