//! Privileged end-to-end test (root, BPF) of hostile gRPC input, as a generic client sees the
//! daemon: it discovers every method through server reflection (as grpcurl does), then sends
//! each one bytes that are not its request message, a message cut short, and an empty
//! request. Every answer is a clear status (never `internal` or `unknown`, never a
//! hang), and the daemon keeps serving.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use bytes_codec::RawCodec;
use prost::Message;
use prost_types::FileDescriptorProto;
use scope_tests::Scoped;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Status};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A codec that sends and receives message bytes as they are: what a generic client that
/// knows no message types does.
mod bytes_codec {
    use tonic::{
        Status,
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    };

    #[derive(Clone, Copy, Default)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;

        fn encoder(&mut self) -> Self::Encoder {
            RawCodec
        }

        fn decoder(&mut self) -> Self::Decoder {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            use bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            use bytes::Buf;
            let mut out = vec![0; src.remaining()];
            src.copy_to_slice(&mut out);
            Ok(Some(out))
        }
    }
}

/// (method name, server streaming) of every method of `service`, from reflection.
async fn methods(channel: tonic::transport::Channel, service: &str) -> Vec<(String, bool)> {
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(service.to_owned())),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&service), "{names:?}");
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor for {service}");
    };
    let (package, name) = service.rsplit_once('.').unwrap();
    files
        .file_descriptor_proto
        .iter()
        .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .filter(|file| file.package() == package)
        .flat_map(|file| file.service)
        .filter(|s| s.name() == name)
        .flat_map(|s| s.method)
        .map(|m| (m.name().to_owned(), m.server_streaming()))
        .collect()
}

/// Sends `body` to `/service/method` and returns the status it got (or `Ok` for success).
async fn call(
    channel: tonic::transport::Channel,
    path: &str,
    streaming: bool,
    body: Vec<u8>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = path.parse().unwrap();
    if streaming {
        let mut stream = grpc
            .server_streaming(Request::new(body), path, RawCodec)
            .await?
            .into_inner();
        // Reading the first message surfaces an error sent after the headers.
        let first = tokio::time::timeout(Duration::from_secs(2), stream.message()).await;
        match first {
            Ok(message) => message.map(|_| ()),
            // A live stream (Watch) that is simply waiting: it accepted the request.
            Err(_) => Ok(()),
        }
    } else {
        grpc.unary(Request::new(body), path, RawCodec)
            .await
            .map(|_| ())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_method_answers_malformed_requests_with_a_clear_error() {
    let scoped = Scoped::start();
    let service = "scope.v1.Scope";
    let methods = methods(scoped.channel().await, service).await;
    assert!(methods.len() >= 14, "{methods:?}");
    for (method, streaming) in &methods {
        let path = format!("/{service}/{method}");
        // Not a protobuf message: a field header promising more than there is.
        let garbage = vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01];
        // A field no request has (field 15, length-delimited) cut short: unknown fields are
        // skipped by protobuf's rules, but not ones that claim bytes that are not there.
        let truncated = vec![0x7a, 0x64, 1, 2];
        for (what, body) in [("garbage", garbage), ("truncated", truncated)] {
            let answer = tokio::time::timeout(
                TIMEOUT,
                call(scoped.channel().await, &path, *streaming, body),
            )
            .await
            .unwrap_or_else(|_| panic!("{path} ({what}) did not answer"));
            let status = answer.expect_err(&format!("{path} accepted {what}"));
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{path} ({what}): {status:?}"
            );
            assert!(
                status.message().contains("failed to decode"),
                "{path} ({what}) says what was wrong: {status:?}"
            );
        }
        // An empty request decodes to all defaults: answered, or refused with a clear
        // status about the request, never as the daemon's failure.
        let answer = tokio::time::timeout(
            TIMEOUT,
            call(scoped.channel().await, &path, *streaming, Vec::new()),
        )
        .await
        .unwrap_or_else(|_| panic!("{path} (empty) did not answer"));
        if let Err(status) = answer {
            assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
                ),
                "{path} (empty): {status:?}"
            );
            assert!(!status.message().is_empty(), "{path} (empty): {status:?}");
        }
    }
    // Still serving, nothing lost.
    let status = scoped.status();
    assert_eq!(status["counters"]["daemon.decode_errors"], 0, "{status}");
    assert!(scoped.log().lines().all(|l| !l.contains("panicked")));
}
