//! `scope flame` (a flame graph of stored calls) and `scope export` (stored calls in another
//! tool's format, or sent to an OpenTelemetry Collector).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::ValueEnum;
use scope_proto::v1::{ExportRequest, FlameRequest, SpanFilter, export_request, flame_request};

use crate::client::Client;

/// `scope export --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// Chrome trace-event JSON: open it in ui.perfetto.dev or chrome://tracing.
    Chrome,
    /// JSON Lines, one call per line (the fields of `scope calls --json`).
    Jsonl,
    /// OTLP/gRPC to an OpenTelemetry Collector (--endpoint); scoped sends, nothing is written.
    Otlp,
}

impl From<ExportFormat> for export_request::Format {
    fn from(format: ExportFormat) -> Self {
        match format {
            ExportFormat::Chrome => export_request::Format::Chrome,
            ExportFormat::Jsonl => export_request::Format::Jsonl,
            ExportFormat::Otlp => export_request::Format::Otlp,
        }
    }
}

/// A file written under a temporary name and renamed into place when complete, so a failed
/// command leaves no truncated file behind (and an existing file untouched).
struct PartialFile {
    path: PathBuf,
    temporary: PathBuf,
    file: Option<BufWriter<File>>,
}

impl PartialFile {
    fn create(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .with_context(|| format!("{} is not a file name", path.display()))?;
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(".scope-partial");
        let temporary = path.with_file_name(temporary_name);
        let file = File::create(&temporary)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(PartialFile {
            path: path.to_owned(),
            temporary,
            file: Some(BufWriter::new(file)),
        })
    }

    fn finish(mut self) -> Result<()> {
        if let Some(file) = self.file.take() {
            file.into_inner()
                .map_err(io::IntoInnerError::into_error)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        std::fs::rename(&self.temporary, &self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

impl Write for PartialFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(file) => file.write(buf),
            None => Err(io::Error::other("already finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            // Not finished: the command failed.
            drop(self.file.take());
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

fn destination(output: Option<&Path>) -> String {
    output.map_or_else(|| "stdout".to_owned(), |p| p.display().to_string())
}

pub struct FlameOptions {
    pub filter: SpanFilter,
    pub folded: bool,
    pub title: Option<String>,
    pub output: Option<PathBuf>,
}

pub async fn flame(client: &Client, out: &mut impl Write, options: FlameOptions) -> Result<()> {
    let mut file = options
        .output
        .as_deref()
        .map(PartialFile::create)
        .transpose()?;
    let format = if options.folded {
        flame_request::Format::Folded
    } else {
        flame_request::Format::Svg
    };
    let response = client
        .rpc
        .clone()
        .flame(FlameRequest {
            filter: Some(options.filter),
            format: format as i32,
            title: options.title.unwrap_or_default(),
        })
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    match file.as_mut() {
        Some(file) => file.write_all(&response.data)?,
        None => out.write_all(&response.data)?,
    }
    if let Some(file) = file {
        file.finish()?;
    }
    out.flush()?;
    eprintln!(
        "scope: {} of {} span{} written to {}",
        if options.folded {
            "folded stacks"
        } else {
            "flame graph"
        },
        response.spans,
        if response.spans == 1 { "" } else { "s" },
        destination(options.output.as_deref())
    );
    Ok(())
}

pub struct ExportOptions {
    pub filter: SpanFilter,
    pub format: ExportFormat,
    pub endpoint: Option<String>,
    pub output: Option<PathBuf>,
}

/// Checks the option combinations clap cannot express on its own.
pub fn check_export(
    format: ExportFormat,
    endpoint: Option<&str>,
    output: Option<&Path>,
) -> Result<(), String> {
    match (format, endpoint, output) {
        (ExportFormat::Otlp, None, _) => Err(
            "--format otlp needs --endpoint URL, the collector's OTLP/gRPC address (e.g. http://localhost:4317)"
                .to_owned(),
        ),
        (ExportFormat::Otlp, Some(_), Some(_)) => {
            Err("--format otlp sends to the collector and writes no file: leave out -o".to_owned())
        }
        (ExportFormat::Chrome | ExportFormat::Jsonl, Some(_), _) => {
            Err("--endpoint is only for --format otlp".to_owned())
        }
        _ => Ok(()),
    }
}

pub async fn export(client: &Client, out: &mut impl Write, options: ExportOptions) -> Result<()> {
    check_export(
        options.format,
        options.endpoint.as_deref(),
        options.output.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let mut file = options
        .output
        .as_deref()
        .map(PartialFile::create)
        .transpose()?;
    let endpoint = options.endpoint.unwrap_or_default();
    let mut stream = client
        .rpc
        .clone()
        .export(ExportRequest {
            filter: Some(options.filter),
            format: export_request::Format::from(options.format) as i32,
            otlp_endpoint: endpoint.clone(),
        })
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    let mut spans = 0;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|status| client.error(status))?
    {
        match file.as_mut() {
            Some(file) => file.write_all(&chunk.data)?,
            None => out.write_all(&chunk.data)?,
        }
        spans = chunk.spans;
    }
    if let Some(file) = file {
        file.finish()?;
    }
    let plural = if spans == 1 { "" } else { "s" };
    if options.format == ExportFormat::Otlp {
        writeln!(out, "sent {spans} span{plural} to {endpoint}")?;
        out.flush()?;
    } else {
        out.flush()?;
        eprintln!(
            "scope: exported {spans} span{plural} to {}",
            destination(options.output.as_deref())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_options_are_checked() {
        assert!(check_export(ExportFormat::Chrome, None, None).is_ok());
        assert!(check_export(ExportFormat::Jsonl, None, Some(Path::new("x"))).is_ok());
        assert!(check_export(ExportFormat::Otlp, Some("http://c:4317"), None).is_ok());
        assert!(
            check_export(ExportFormat::Otlp, None, None)
                .expect_err("needs an endpoint")
                .contains("--endpoint")
        );
        assert!(check_export(ExportFormat::Otlp, Some("http://c"), Some(Path::new("x"))).is_err());
        assert!(check_export(ExportFormat::Chrome, Some("http://c"), None).is_err());
    }

    #[test]
    fn partial_files_appear_only_when_finished() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.json");
        std::fs::write(&path, "old").expect("write");
        let mut file = PartialFile::create(&path).expect("create");
        file.write_all(b"new").expect("write");
        drop(file);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "old",
            "a failure keeps the old file"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temporary left"
        );
        let mut file = PartialFile::create(&path).expect("create");
        file.write_all(b"new").expect("write");
        file.finish().expect("finish");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
        assert!(PartialFile::create(&dir.path().join("no/such/dir/x")).is_err());
    }
}
