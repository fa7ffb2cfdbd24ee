//! A JSON response body written straight from its value by serde.
//!
//! poem-openapi's `Json<T>` first turns the whole answer into a `serde_json::Value` tree
//! (`ToJSON`), cloning every event in it, and then writes that tree. For the large, hot
//! answers (`/sync`) [`SerdeJson`] writes the value itself: the same document and schema, one
//! pass. Its type derives both `Object` (for the OpenAPI schema) and `Serialize` (for the
//! body); a test beside the type (`client/sync.rs`) keeps the two in agreement.

use palpo_core::Error;
use poem::{IntoResponse, Response, http::header};
use poem_openapi::{
    ApiResponse,
    payload::{Json, Payload},
    registry::{MetaResponses, MetaSchemaRef, Registry},
    types::{ToJSON, Type},
};
use serde::Serialize;

use crate::error::{MatrixError, render_error};

/// A `200` JSON body, documented as poem-openapi's `Json<T>` and written by serde.
pub struct SerdeJson<T>(pub T);

impl<T: Type> Payload for SerdeJson<T> {
    const CONTENT_TYPE: &'static str = <Json<T> as Payload>::CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        <Json<T> as Payload>::check_content_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Type + Serialize + Send> IntoResponse for SerdeJson<T> {
    fn into_response(self) -> Response {
        // serde_json itself (not whatever poem's `Json` is built with): events in the answer
        // are `RawValue`s, which only serde_json writes as they are.
        match serde_json::to_vec(&self.0) {
            Ok(body) => Response::builder()
                .header(header::CONTENT_TYPE, <Self as Payload>::CONTENT_TYPE)
                .body(body),
            Err(e) => {
                tracing::error!(error = %e, "writing a JSON answer failed");
                render_error(
                    MatrixError::from(Error::internal("could not write the answer")).into(),
                )
            }
        }
    }
}

impl<T: ToJSON + Serialize + Send> ApiResponse for SerdeJson<T> {
    fn meta() -> MetaResponses {
        <Json<T> as ApiResponse>::meta()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}
