//! The baseline for `bench/grpc.sh`: a bare tonic server answering
//! `user.UserService/GetUser` with a fixed user from memory — no database, no
//! auth, no layers — from the same generated code prism uses.

use prism::grpc::pb::user::{
    CreateUserRequest, StreamRequest, UserRequest, UserResponse,
    user_service_server::{UserService, UserServiceServer},
};
use tonic::{Request, Response, Status};

struct Bare;

#[tonic::async_trait]
impl UserService for Bare {
    async fn get_user(&self, req: Request<UserRequest>) -> Result<Response<UserResponse>, Status> {
        Ok(Response::new(UserResponse {
            id: req.get_ref().id,
            name: "Alice".into(),
            email: "alice@example.com".into(),
        }))
    }

    async fn create_user(
        &self,
        _: Request<CreateUserRequest>,
    ) -> Result<Response<UserResponse>, Status> {
        Err(Status::unimplemented("bare baseline"))
    }

    type StreamUsersStream = futures::stream::Empty<Result<UserResponse, Status>>;

    async fn stream_users(
        &self,
        _: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamUsersStream>, Status> {
        Err(Status::unimplemented("bare baseline"))
    }
}

// The same allocator as prism, so the comparison measures the framework.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let port = std::env::args().nth(1).unwrap_or_else(|| "18052".into());
    tonic::transport::Server::builder()
        .add_service(UserServiceServer::new(Bare))
        .serve(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
}
