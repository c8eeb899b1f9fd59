//! The tonic implementation of `dpo.v1.Reference` over the [`Engine`]. Until the model is
//! loaded every call is `UNAVAILABLE` (the health check says NOT_SERVING meanwhile).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use dpo_proto::client::MODEL_FINGERPRINT_HEADER;
use dpo_proto::v1;
use dpo_proto::v1::reference_server::Reference;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::Engine;
use crate::message_limit;

/// Requests of one ScoreStream being scored at once; further ones wait to be read, which
/// pushes back on the client through HTTP/2 flow control.
const STREAM_IN_FLIGHT: usize = 64;

#[derive(Clone)]
pub struct ReferenceService {
    engine: Arc<OnceLock<Arc<Engine>>>,
}

impl ReferenceService {
    /// A service that answers once `engine` is set.
    pub fn new(engine: Arc<OnceLock<Arc<Engine>>>) -> Self {
        ReferenceService { engine }
    }

    fn engine(&self) -> Result<Arc<Engine>, Status> {
        self.engine
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("the reference model is still loading"))
    }
}

/// A response that names the model answering ([`MODEL_FINGERPRINT_HEADER`]), so that a
/// client whose connection was silently re-established to a server restarted with another
/// model notices.
fn answer<T>(engine: &Engine, body: T) -> Response<T> {
    let mut response = Response::new(body);
    if let Ok(value) = engine.fingerprint().parse() {
        response.metadata_mut().insert(MODEL_FINGERPRINT_HEADER, value);
    }
    response
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::ScoreResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Reference for ReferenceService {
    async fn score(
        &self,
        request: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreResponse>, Status> {
        let engine = self.engine()?;
        let req = request.into_inner();
        let n = req.items.len();
        let started = std::time::Instant::now();
        match engine.score(req).await {
            Ok(r) => {
                tracing::debug!(items = n, ms = started.elapsed().as_millis() as u64, "Score");
                Ok(answer(&engine, r))
            }
            Err(e) => {
                tracing::info!(items = n, "Score refused: {e}");
                Err(e.into())
            }
        }
    }

    type ScoreStreamStream = ResponseStream;

    async fn score_stream(
        &self,
        request: Request<Streaming<v1::ScoreRequest>>,
    ) -> Result<Response<Self::ScoreStreamStream>, Status> {
        let engine = self.engine()?;
        let max_message_bytes = engine.limits().max_message_bytes;
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT);
        let response = answer(&engine, ());
        let slots = Arc::new(tokio::sync::Semaphore::new(STREAM_IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(next) = incoming.next().await {
                let req = match next {
                    Ok(r) => r,
                    Err(status) => {
                        // A broken or oversized message ends the stream with its status
                        // (tonic cannot read past it).
                        let _ =
                            tx.send(Err(message_limit::rewrite(status, max_message_bytes))).await;
                        return;
                    }
                };
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let (engine, tx) = (engine.clone(), tx.clone());
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let id = req.request_id;
                    let resp = match engine.score(req).await {
                        Ok(r) => r,
                        Err(e) => {
                            let status = Status::from(e);
                            v1::ScoreResponse {
                                request_id: id,
                                items: vec![],
                                error: Some(v1::Error {
                                    code: status.code() as i32,
                                    message: status.message().to_string(),
                                }),
                            }
                        }
                    };
                    crate::metrics::metrics().score_stream_message(&resp, started);
                    let _ = tx.send(Ok(resp)).await;
                    drop(slot);
                });
            }
        });
        Ok(response.map(|()| Box::pin(ReceiverStream::new(rx)) as ResponseStream))
    }

    type GenerateStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateResponse, Status>> + Send>>;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let engine = self.engine()?;
        match engine.generate(request.into_inner()).await {
            Ok(rx) => {
                Ok(answer(&engine, Box::pin(ReceiverStream::new(rx)) as Self::GenerateStream))
            }
            Err(e) => {
                tracing::info!("Generate refused: {e}");
                Err(e.into())
            }
        }
    }

    async fn model_info(
        &self,
        _request: Request<v1::ModelInfoRequest>,
    ) -> Result<Response<v1::ModelInfoResponse>, Status> {
        let engine = self.engine()?;
        Ok(answer(&engine, engine.model_info()))
    }
}
